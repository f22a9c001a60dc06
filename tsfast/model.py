"""A GPT-2 language model written only in `tsfast.ops` calls.

Pre-LayerNorm blocks, GELU-tanh MLP, residual dropout, tied input/output embeddings, rotary
positions (default) or GPT-2's learned position table. The model never knows which backend
runs an op: `tsfast.ops` decides per call, so the Triton kernels slot in without a change
here.

    ln_1 -> c_attn        ops.layernorm_linear            (B, T, 3C)
    attention             ops.rope_attention              (B, nh, T, hs)
    ln_2 -> c_fc -> GELU  ops.layernorm_linear(gelu_tanh) (B, T, 4C)
    ln_f                  ops.layer_norm
    loss                  ops.linear_cross_entropy        (never the full (N, V) logits)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsfast import ops
from tsfast.config import GPTConfig


class KVCache:
    """Keys and values of every layer for positions 0 .. length-1. Rotary keys are stored
    rotated (each rotated once, when it is appended), so a decoding step rotates only its
    new query and key instead of every cached key."""

    def __init__(self, config: GPTConfig, batch_size: int, *, device, dtype, max_len: int | None = None):
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.n_head, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) after the cached positions; return all keys and values."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested (re-run the window in a fresh cache)")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def view(self, batch: int, length: int) -> KVCache:
        """A cache over the first `batch` rows that shares this one's storage and holds
        `length` positions (batched decoding: tsfast/batching.py)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, :batch], self.v[:, :batch]
        view.max_len, view.length = self.max_len, length
        return view


class LayerNorm(nn.Module):
    """Holds a LayerNorm's parameters; the math runs in ops (fused into the next matmul)."""

    def __init__(self, n: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.ln_1 = LayerNorm(C, config.bias)
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)
        self.attn_proj = nn.Linear(C, C, bias=config.bias)
        self.ln_2 = LayerNorm(C, config.bias)
        self.c_fc = nn.Linear(C, 4 * C, bias=config.bias)
        self.mlp_proj = nn.Linear(4 * C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, layer: int = 0, doc_ids=None):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        qkv = ops.layernorm_linear(x, self.ln_1.weight, self.ln_1.bias, self.c_attn.weight, self.c_attn.bias)
        # Strided views of the fused projection, no copies: each (B, nh, T, hs).
        q, k, v = qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            if cos is not None:  # the new tokens' tables (GPT.hidden): rotate once, cache rotated
                q, k, cos, sin = ops.rope_rotate(q, cos, sin), ops.rope_rotate(k, cos, sin), None, None
            k, v = kv_cache.append(layer, k, v)  # (B, nh, S, hs), S = cached + T
        p = self.dropout if self.training else 0.0
        y = ops.rope_attention(q, k, v, cos, sin, causal=True, dropout_p=p, doc_ids=doc_ids)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + self.resid_dropout(self.attn_proj(y))
        h = ops.layernorm_linear(
            x, self.ln_2.weight, self.ln_2.bias, self.c_fc.weight, self.c_fc.bias, activation="gelu_tanh"
        )  # (B, T, 4C)
        return x + self.resid_dropout(self.mlp_proj(h))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V, C = config.padded_vocab_size, config.n_embd
        self.wte = nn.Embedding(V, C)  # tied with the output layer
        self.wpe = nn.Embedding(config.block_size, C) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(C, config.bias)
        if config.pos == "rope":
            cos, sin = ops.rope_cos_sin(config.block_size, config.head_dim, base=config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (T, hs/2) fp32
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("attn_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _apply(self, fn, *args, **kwargs):
        # model.to(bf16) would round the rotary tables too; the op contract wants them fp32,
        # so rebuild them exactly on whatever device the model moved to.
        super()._apply(fn, *args, **kwargs)
        if self.config.pos == "rope" and self.rope_cos.dtype != torch.float32:
            c = self.config
            self.rope_cos, self.rope_sin = ops.rope_cos_sin(
                c.block_size, c.head_dim, base=c.rope_base, device=self.rope_cos.device
            )
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """All parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, *, kv_cache: KVCache | None = None, all_logits: bool = False,
                doc_ids=None):
        """idx: (B, T) token ids. With targets (B, T): returns (None, loss); ids equal to -100
        in targets are ignored. Without: returns (logits, None), logits (B, 1, vocab) for the
        last position, or (B, T, vocab) with all_logits. kv_cache: decode after its positions.
        doc_ids: (B, cached + T) non-decreasing ids, one run per document (story): attention
        stays within a document and positions restart at each (ops.rope_attention)."""
        B, T = idx.shape
        x = self.hidden(idx, kv_cache=kv_cache, doc_ids=doc_ids)  # (B, T, C)
        if targets is not None:
            loss = ops.linear_cross_entropy(x.view(B * T, -1), self.wte.weight, targets.reshape(-1))
            return None, loss
        h = x if all_logits else x[:, -1:]
        logits = F.linear(h, self.wte.weight)[..., : self.config.vocab_size]
        return logits, None

    def hidden(self, idx, *, kv_cache: KVCache | None = None, doc_ids=None):
        """The final LayerNorm's output (B, T, C), the input of the tied output layer
        (`forward` without the output layer: batched decoding runs its own)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        cos = sin = None
        if self.wpe is not None:
            pos = torch.arange(start, start + T, device=idx.device)
            if doc_ids is not None:
                pos = ops.doc_positions(doc_ids)[:, start:]  # (B, T)
            x = x + self.wpe(pos)
        elif kv_cache is None:
            cos, sin = self.rope_cos[: start + T], self.rope_sin[: start + T]
        elif doc_ids is None:  # with a cache: the tables of the new tokens only (Block.forward)
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hs/2)
        else:
            pos = ops.doc_positions(doc_ids)[:, start:]  # (B, T)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hs/2)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv_cache, i, doc_ids)
        if kv_cache is not None:
            kv_cache.advance(T)
        return ops.layer_norm(x, self.ln_f.weight, self.ln_f.bias)
