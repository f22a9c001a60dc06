"""A faster torch path for causal rope_attention with doc_ids on CPU (fp32, Tq == Tk, no
dropout): a prototype for `attention._torch_path`, which now builds a (B, 1, T, T) boolean
mask with causality folded in and runs SDPA (ATen's CPU flash kernel) with it over the row.

Measured (BENCHMARKS.md): ATen's CPU flash kernel does nearly all T² (query, key) pairs of
a row at T <= 512 whether it is told is_causal or given a mask (it skips key blocks of 512 at
a time), so neither causality nor the document mask saves work there. This path cuts the
queries into chunks of CHUNK and gives each chunk only the keys it can see: from the first
document start among the chunk's first queries (over the batch) to the chunk's last query.
With TinyStories' ~200-token stories most of a 512-token row's pairs are never computed.

- the rotation is the lean one (`rotary.rotate`, no autograd) with per-token tables
  cos[pos], sin[pos] (B, 1, T, D/2), redone in backward instead of kept, as
  `attention._RopeFlashAttentionCPU` does without doc_ids;
- one additive (B, 1, T, T) mask (0 where the key is visible, -inf elsewhere) is built
  per call and each chunk reads its slice; backward rebuilds it rather than keeping it;
- backward runs the kernel's backward per chunk and adds each chunk's key and value
  gradients into place (chunks' key ranges overlap).

Contract and numerics: those of `attention.rope_attention` for the calls `takes` accepts.
"""

from __future__ import annotations

import torch

from tsfast.ops.rotary import bthd_empty, doc_positions, rotate

CHUNK = 64  # queries per kernel call


def takes(q, k, doc_ids, *, causal: bool, dropout_p: float) -> bool:
    """Whether `doc_attention` can run this call (the training shape on CPU, fp32)."""
    return (doc_ids is not None and causal and q.device.type == "cpu" and q.dtype == torch.float32
            and q.shape[2] == k.shape[2] and dropout_p == 0.0)


def visible_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where key s is visible to query t (s <= t, same
    document), -inf elsewhere."""
    T = doc_ids.shape[1]
    hidden = doc_ids[:, None, :, None] != doc_ids[:, None, None, :]
    hidden |= torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).triu(1)
    return torch.zeros(hidden.shape, dtype=dtype, device=doc_ids.device).masked_fill_(hidden, float("-inf"))


def chunks(doc_ids: torch.Tensor, chunk: int) -> list[tuple[int, int, int]]:
    """(first query, end of queries, first key) of each chunk: its queries see no key
    before the earliest document start of its first query over the batch (a host sync)."""
    T = doc_ids.shape[1]
    starts = torch.arange(T, device=doc_ids.device) - doc_positions(doc_ids)  # (B, T)
    firsts = starts[:, ::chunk].min(dim=0).values.tolist()
    return [(q0, min(T, q0 + chunk), k0) for q0, k0 in zip(range(0, T, chunk), firsts, strict=True)]


class _RopeDocFlashAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, doc_ids, scale):
        if cos is not None:
            pos = doc_positions(doc_ids)
            cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, D/2), shared by heads
            qr, kr = rotate(q, cos, sin), rotate(k, cos, sin)
        else:
            qr, kr = q, k
        mask = visible_mask(doc_ids, q.dtype)
        parts = chunks(doc_ids, CHUNK)
        o = bthd_empty(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        for q0, q1, k0 in parts:
            o[:, :, q0:q1], lse[:, :, q0:q1] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qr[:, :, q0:q1], kr[:, :, k0:q1], v[:, :, k0:q1], 0.0, False,
                attn_mask=mask[:, :, q0:q1, k0:q1], scale=scale,
            )
        ctx.save_for_backward(q, k, v, cos, sin, doc_ids, o, lse)
        ctx.parts, ctx.scale = parts, scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, cos, sin, doc_ids, o, lse = ctx.saved_tensors
        qr, kr = (rotate(q, cos, sin), rotate(k, cos, sin)) if cos is not None else (q, k)
        if grad_o.stride(-1) != 1:
            grad_o = grad_o.contiguous()
        mask = visible_mask(doc_ids, q.dtype)
        dq, dk, dv = bthd_empty(q), torch.zeros_like(k), torch.zeros_like(v)
        for q0, q1, k0 in ctx.parts:
            dq_c, dk_c, dv_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_o[:, :, q0:q1], qr[:, :, q0:q1], kr[:, :, k0:q1], v[:, :, k0:q1],
                o[:, :, q0:q1], lse[:, :, q0:q1], 0.0, False,
                attn_mask=mask[:, :, q0:q1, k0:q1], scale=ctx.scale,
            )
            dq[:, :, q0:q1] = dq_c
            dk[:, :, k0:q1] += dk_c
            dv[:, :, k0:q1] += dv_c
        if cos is not None:
            dq, dk = rotate(dq, cos, sin, inverse=True), rotate(dk, cos, sin, inverse=True)
        return dq, dk, dv, None, None, None, None


def doc_attention(q, k, v, cos, sin, doc_ids, *, scale: float | None = None):
    """rope_attention(q, k, v, cos, sin, causal=True, scale=scale, doc_ids=doc_ids) for the
    calls `takes` accepts; arguments already validated by the op."""
    return _RopeDocFlashAttentionCPU.apply(q, k, v, cos, sin, doc_ids, scale)
