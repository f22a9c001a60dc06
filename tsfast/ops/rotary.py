"""Rotary position tables and the rotate-half rotation used by the torch attention path.

Rotate-half (GPT-NeoX / Llama) with x1 = x[..., :D/2], x2 = x[..., D/2:] and the tables
c = cos[pos], s = sin[pos] (D/2 each):

    R x   = cat(x1 c - x2 s,  x2 c + x1 s)
    R^T y = cat(y1 c + y2 s,  y2 c - y1 s)      the inverse rotation, used on gradients
"""

from __future__ import annotations

import torch

from tsfast.ops._checks import wants_grad


def rope_cos_sin(
    seq_len: int, head_dim: int, *, base: float = 10000.0, offset: int = 0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (T, D/2) float32 cos and sin tables for positions offset .. offset+seq_len-1."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 rotary positions: each token's index minus its document's first index.

    doc_ids (B, T) is non-decreasing along T, so a document is a run of equal ids and its
    start is the last index at or before t where the id changed (a running max)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R x, with autograd. x: (..., T, D); cos, sin: (T, D/2) fp32, or per-token tables that
    broadcast against x[..., :D/2] (e.g. (B, 1, T, D/2)).

    Computed in fp32 for fp16/bf16 inputs and in x's own dtype for fp32 and float64."""
    d2 = x.shape[-1] // 2
    dt = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x[..., :d2].to(dt), x[..., d2:].to(dt)
    c, s = cos.to(dt), sin.to(dt)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def bthd_empty(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D), the layout of the fused qkv
    projection: ATen's CPU flash attention gives its output (and gradients) the layout of
    its query, and in this one the model's transpose(1, 2).reshape(B, T, C) is a view."""
    if x.dim() != 4:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    B, H, T, D = x.shape
    return torch.empty(B, T, H, D, dtype=x.dtype, device=x.device).transpose(1, 2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False):
    """R x (or R^T x) into a new tensor laid out as `bthd_empty` says, without autograd: two
    multiplies and two multiply-adds, each writing one half of the output in place.
    x: (..., T, D) with x.dtype == cos.dtype."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    sign = 1.0 if inverse else -1.0
    if torch.compiler.is_compiling():  # Dynamo takes no strided out=; inductor fuses this
        return torch.cat((x1 * cos + sign * x2 * sin, x2 * cos - sign * x1 * sin), dim=-1)
    out = bthd_empty(x)
    o1, o2 = out[..., :d2], out[..., d2:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=-sign)
    return out


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R x as rope_attention's torch path rotates q and k: without autograd in fp32 the lean
    `rotate` (4 ops instead of 7), else `apply_rope`. Decoding with a KV cache rotates each
    new key once with it, into the cache (tsfast/model.py), and the same way each query."""
    if x.dtype == torch.float32 and not wants_grad(x):
        return rotate(x, cos, sin)
    return apply_rope(x, cos, sin)
