"""The oracle: every op written out plainly, run in float64 by the parity suite.

No private ATen ops, no custom autograd, no fused kernels, full logits, explicit masks and
explicit per-token rotary positions; gradients come from plain autograd. Each function works
in any float dtype: in float64 it is the reference, in a lower dtype it measures what plain
PyTorch arithmetic costs in that dtype (the baseline of the 2x rule, docs/design.md).
"""

from __future__ import annotations

import math

import torch


def positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's index minus the index of its document's first token, by a plain loop."""
    B, T = doc_ids.shape
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = pos[b, t - 1] + 1 if doc_ids[b, t] == doc_ids[b, t - 1] else 0
    return pos.to(doc_ids.device)


def rotate(x, cos, sin):
    """Rotate-half rotary; cos, sin broadcast against x[..., :D/2]."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_attention(q, k, v, cos=None, sin=None, *, causal=True, scale=None, doc_ids=None):
    """softmax(rope(q) rope(k)^T * scale + mask) v with the mask built element by element
    from its definition (queries are the last Tq of the Tk positions)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)
    kpos = torch.arange(Tk, device=q.device)
    allowed = torch.ones(B, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= (kpos[None, :] <= qpos[:, None])[None]
    if doc_ids is not None:
        allowed &= doc_ids[:, Tk - Tq :, None] == doc_ids[:, None, :]
    if cos is not None:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        if doc_ids is None:
            k_cos, k_sin = cos[None, None], sin[None, None]
        else:
            pos = positions(doc_ids)
            k_cos, k_sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, Tk, D/2)
        q = rotate(q, k_cos[..., Tk - Tq :, :], k_sin[..., Tk - Tq :, :])
        k = rotate(k, k_cos, k_sin)
    scale = D**-0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def layer_norm(x, weight, bias=None, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layernorm_linear(x, ln_weight, ln_bias, weight, bias=None, *, activation=None, eps=1e-5):
    y = layer_norm(x, ln_weight, ln_bias, eps) @ weight.t()
    if bias is not None:
        y = y + bias
    return gelu_tanh(y) if activation == "gelu_tanh" else y


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    lse = torch.logsumexp(logits, dim=-1)
    rows = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, reduction="mean"):
    return cross_entropy(h @ weight.t(), targets, ignore_index=ignore_index, reduction=reduction)
