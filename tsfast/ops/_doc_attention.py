"""A faster torch path for rope_attention with doc_ids on CPU (fp32, Tq == Tk, no dropout).

A prototype for `attention._torch_path` to call where it now builds a (B, 1, Tq, Tk) boolean
mask with causality folded in and runs SDPA with is_causal=False. That way ATen's CPU flash
kernel still runs (it takes a mask), but it cannot skip the key blocks past the diagonal: it
computes every (query, key) pair of the row, twice the causal work. Here:

- the private flash op gets is_causal=True *and* an additive mask that holds only the
  same-document condition, so the kernel skips the upper triangle as it does without
  doc_ids and applies the document mask within the blocks it computes;
- the rotation is the lean one (`rotary.rotate`, no autograd) with per-token tables
  cos[pos], sin[pos] of shape (B, 1, T, D/2), and it is redone in backward instead of
  keeping rotated copies, as `attention._RopeFlashAttentionCPU` does without doc_ids;
- the mask is rebuilt in backward (B·T² compares) rather than kept: 8 MB a layer at baby_cpu.

Contract and numerics: those of `attention.rope_attention` (module docstring) for the calls
`takes` accepts. Figures against the current path: BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from tsfast.ops.rotary import doc_positions, rotate


def takes(q, k, doc_ids, dropout_p: float) -> bool:
    """Whether `doc_attention` can run this call (the training shape on CPU, fp32)."""
    return (doc_ids is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and q.shape[2] == k.shape[2] and dropout_p == 0.0)


def document_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where query and key share a document, -inf elsewhere.
    Causality is not in it (the kernel applies it with is_causal)."""
    other = doc_ids[:, None, :, None] != doc_ids[:, None, None, :]
    return torch.zeros(other.shape, dtype=dtype, device=doc_ids.device).masked_fill_(other, float("-inf"))


class _RopeDocFlashAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, doc_ids, causal, scale):
        if cos is not None:
            pos = doc_positions(doc_ids)
            cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, D/2), shared by heads
            qr, kr = rotate(q, cos, sin), rotate(k, cos, sin)
        else:
            qr, kr = q, k
        mask = document_mask(doc_ids, q.dtype)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qr, kr, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        ctx.save_for_backward(q, k, v, cos, sin, doc_ids, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, cos, sin, doc_ids, o, lse = ctx.saved_tensors
        qr, kr = (rotate(q, cos, sin), rotate(k, cos, sin)) if cos is not None else (q, k)
        if grad_o.stride(-1) != 1:
            grad_o = grad_o.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_o, qr, kr, v, o, lse, 0.0, ctx.causal, attn_mask=document_mask(doc_ids, q.dtype), scale=ctx.scale
        )
        if cos is not None:
            dq, dk = rotate(dq, cos, sin, inverse=True), rotate(dk, cos, sin, inverse=True)
        return dq, dk, dv, None, None, None, None, None


def doc_attention(q, k, v, cos, sin, doc_ids, *, causal: bool = True, scale: float | None = None):
    """rope_attention(q, k, v, cos, sin, causal=causal, scale=scale, doc_ids=doc_ids) for the
    calls `takes` accepts; arguments already validated by the op."""
    return _RopeDocFlashAttentionCPU.apply(q, k, v, cos, sin, doc_ids, causal, scale)
