"""The torch path of linear_cross_entropy: rows in chunks, one reused logits buffer.

Chunked over rows with its own autograd.Functions, so the CPU/MPS path never holds the full
(N, V) logits either. Why the chunks are shaped as they are, with figures: BENCHMARKS.md.
"""

from __future__ import annotations

import torch


def reduce_rows(loss, targets, ignore_index, reduction):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    # clamp_min keeps an all-ignored batch at 0 instead of 0/0, without a host sync.
    count = (targets != ignore_index).sum().clamp_min(1)
    return total / count


# Rows per chunk of the chunked linear cross-entropy: one (rows, V) logits buffer of at most
# about CHUNK_BYTES, reused by every chunk. Each chunk reads W twice and reads and writes
# the (V, C) dW accumulator once, and MKL's GEMMs at these thin shapes (K = C or K = rows)
# run closer to the square-matmul rate the more rows they get: measured on the 2-core CPU
# at C = 256, V = 50304, 128 rows ran at ~60% of a 2048^3 mm and 512 rows at ~93%
# (BENCHMARKS.md). The buffer is what a chunk costs in memory.
CHUNK_BYTES = 128 * 2**20
MIN_CHUNK_ROWS = 16


def _chunk_rows(n_rows: int, vocab: int, elem_bytes: int = 4) -> int:
    """Rows per chunk: chunks of equal size (no short last chunk), each within CHUNK_BYTES."""
    if n_rows <= 0:
        return 1
    most = max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(vocab * elem_bytes, 1))
    n_chunks = -(-n_rows // most)
    return max(1, -(-n_rows // n_chunks))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _lce_chunks(h, weight, targets, ignore_index, row_w, want_dh: bool, want_dW: bool):
    """Per-row losses and, if asked, dh and dW of sum_r row_w[r] * loss_r, chunk by chunk.

    Per chunk of rows, in one reused logits buffer z (fp32; float64 for float64 inputs):
        z = h_c @ W^T                       one GEMM, written once
        m = max_j z                         a read pass (softmax's own max is not returned)
        z = softmax(z)                      in place (row by row, the row stays in cache)
        loss_r = m - log(max_j z) - z_t     = lse - z_t: the largest probability is
                                            exp(m - lse) >= 1/V, so it cannot underflow
        z[r, t_r] -= 1                      z is now dlogits / w_r
        dh_c = w_r * (z @ W)                row weights applied to the small (n, C) sides,
        dW += z^T @ (w_r * h_c)             never in a pass over the (n, V) buffer
    The target logits z_t are gathered before the softmax; ignored rows get loss 0 (and
    must get row weight 0). Returns (loss (N,), dh or None, dW or None) in the compute dtype.
    """
    N, C = h.shape
    V = weight.shape[0]
    dt = _compute_dtype(h)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0)[:, None]
    w = weight.to(dt)  # no copy when weight is already in the compute dtype
    hd = h.to(dt)
    row_w = row_w.to(dt)[:, None]
    loss = torch.empty(N, dtype=dt, device=h.device)
    dh = torch.empty(N, C, dtype=dt, device=h.device) if want_dh else None
    dW = None
    if want_dW:  # written by the first chunk's GEMM, added to by the others: no zero fill
        dW = (torch.empty if N else torch.zeros)(V, C, dtype=dt, device=h.device)
    step = _chunk_rows(N, V, torch.finfo(dt).bits // 8)
    buf = torch.empty(min(step, N), V, dtype=dt, device=h.device)
    for s in range(0, N, step):
        e = min(s + step, N)
        hc, t = hd[s:e], safe_t[s:e]
        z = buf[: e - s]
        torch.mm(hc, w.t(), out=z)
        z_t = z.gather(1, t).squeeze(1)
        m = z.amax(dim=1)
        torch.softmax(z, dim=1, out=z)
        loss[s:e] = (m - z.amax(dim=1).log() - z_t) * valid[s:e]
        if want_dh or want_dW:
            z.scatter_add_(1, t, torch.full_like(z_t[:, None], -1.0))
        if want_dh:
            torch.mm(z, w, out=dh[s:e])
            dh[s:e] *= row_w[s:e]
        if want_dW and s == 0:
            torch.mm(z.t(), hc * row_w[s:e], out=dW)
        elif want_dW:
            dW.addmm_(z.t(), hc * row_w[s:e])
    return loss, dh, dW


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """"mean"/"sum": the loss and both gradients in one chunked forward (`_lce_chunks`, with
    w_r = 1/count for "mean", 1 for "sum", 0 for an ignored row); backward only rescales
    them, in place. Three GEMMs per chunk, as for a full-logits forward and backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, grad_enabled):
        valid = targets != ignore_index
        row_w = valid.to(_compute_dtype(h))
        if reduction == "mean":
            row_w = row_w / valid.sum().clamp_min(1)
        # Inside forward grad mode is off and needs_input_grad ignores it: the caller's
        # mode comes in as grad_enabled, so a no_grad evaluation computes only the loss.
        want_dh = grad_enabled and ctx.needs_input_grad[0]
        want_dW = grad_enabled and ctx.needs_input_grad[1]
        loss, dh, dW = _lce_chunks(h, weight, targets, ignore_index, row_w, want_dh, want_dW)
        if want_dh or want_dW:
            ctx.grads = (
                None if dh is None else dh.to(h.dtype),
                None if dW is None else dW.to(weight.dtype),
            )
        total = (loss * row_w).sum() if reduction == "mean" else loss.sum()
        return total.to(torch.promote_types(h.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_out):
        if not hasattr(ctx, "grads"):
            raise RuntimeError(
                "the chunked linear_cross_entropy's gradients were already used: it does not "
                "support backward twice (retain_graph); compute the loss again"
            )
        dh, dW = ctx.grads
        del ctx.grads  # scaled in place below, so a second backward must not see them
        if dh is not None:
            dh = dh.mul_(grad_out.to(dh.dtype))
        if dW is not None:
            dW = dW.mul_(grad_out.to(dW.dtype))
        return dh, dW, None, None, None, None


class _ChunkedLinearCrossEntropyRows(torch.autograd.Function):
    """"none": per-row losses in forward (one GEMM per chunk, no gradients, since the
    per-row upstream gradient is not known yet); backward recomputes each chunk's logits
    and runs `_lce_chunks` with w_r = upstream_r (0 for ignored rows)."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index):
        valid = targets != ignore_index
        loss, _, _ = _lce_chunks(h, weight, targets, ignore_index, valid, False, False)
        ctx.save_for_backward(h, weight, targets)
        ctx.ignore_index = ignore_index
        return loss.to(torch.promote_types(h.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_rows):
        h, weight, targets = ctx.saved_tensors
        row_w = grad_rows * (targets != ctx.ignore_index)
        want_dh, want_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        _, dh, dW = _lce_chunks(h, weight, targets, ctx.ignore_index, row_w, want_dh, want_dW)
        return (
            None if dh is None else dh.to(h.dtype),
            None if dW is None else dW.to(weight.dtype),
            None,
            None,
        )


def linear_cross_entropy_chunked(h, weight, targets, ignore_index=-100, reduction="mean"):
    """cross_entropy(h @ weight^T, targets) without holding the full (N, V) logits."""
    if reduction == "none":
        return _ChunkedLinearCrossEntropyRows.apply(h, weight, targets, ignore_index)
    return _ChunkedLinearCrossEntropy.apply(
        h, weight, targets, ignore_index, reduction, torch.is_grad_enabled()
    )
