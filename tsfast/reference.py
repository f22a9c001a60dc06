"""Pure-PyTorch versions of every tsfast op: the CPU/MPS path and the test oracle.

Each function implements the contract in DESIGN.md exactly; `tsfast.ops` validates
arguments before calling here, so these functions assume well-formed inputs.

`linear_cross_entropy` is chunked over rows with its own autograd.Function, so the CPU/MPS
path never holds the full (N, V) logits either; `linear_cross_entropy_full` is the plain
full-logits formulation kept as the oracle. On CPU in fp32, training-shaped attention goes
through ATen's flash kernel in `_RopeFlashAttentionCPU`; float64 always takes the explicit
math path (`attention_math`), the oracle. Why each fast path is shaped as it is, with
figures: BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- rotary


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: (..., T, D); cos, sin: (T, D/2) fp32.

    Computed in fp32 for fp16/bf16 inputs and in x's own dtype for fp32 and float64 (the
    float64 oracle stays float64 throughout)."""
    d2 = x.shape[-1] // 2
    dt = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x[..., :d2].to(dt), x[..., d2:].to(dt)
    c, s = cos.to(dt), sin.to(dt)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


def _bthd_empty(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D), the layout of the fused qkv
    projection: ATen's CPU flash attention gives its output (and gradients) the layout of
    its query, and in this one the model's transpose(1, 2).reshape(B, T, C) is a view."""
    if x.dim() != 4:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    B, H, T, D = x.shape
    return torch.empty(B, T, H, D, dtype=x.dtype, device=x.device).transpose(1, 2)


def _rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False):
    """rope(x) (or its inverse, the rotation by -angle: rope's transpose, so the gradient)
    into a new tensor (laid out as `_bthd_empty` says), without autograd: two multiplies and two multiply-adds,
    each writing one half of the output in place. x: (..., T, D) with x.dtype == cos.dtype."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    sign = 1.0 if inverse else -1.0
    if torch.compiler.is_compiling():  # Dynamo takes no strided out=; inductor fuses this
        return torch.cat((x1 * cos + sign * x2 * sin, x2 * cos - sign * x1 * sin), dim=-1)
    out = _bthd_empty(x)
    o1, o2 = out[..., :d2], out[..., d2:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=-sign)
    return out


def rope_cos_sin(
    seq_len: int, head_dim: int, *, base: float = 10000.0, offset: int = 0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (T, D/2) float32 cos and sin tables for positions offset .. offset+seq_len-1."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


# ----------------------------------------------------------------------------- attention


def rope_attention(q, k, v, cos, sin, *, causal=True, scale=None, dropout_p=0.0):
    """softmax(rope(q) @ rope(k)^T * scale + mask) @ v. q: (B, H, Tq, D); k, v: (B, H, Tk, D).

    Tq < Tk is decoding with a KV cache: the queries are the last Tq positions, cos/sin
    cover all Tk key positions, and the causal mask is aligned to the bottom right.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if _cpu_flash_applies(q, Tk, dropout_p):
        return _RopeFlashAttentionCPU.apply(q, k, v, cos, sin, causal, scale)
    if cos is not None:
        # Without autograd (decoding), fp32 takes the lean rotation: 4 ops instead of 7.
        lean = q.dtype == cos.dtype == torch.float32 and not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        )
        rope = _rope_forward if lean else apply_rope
        q = rope(q, cos[Tk - Tq :], sin[Tk - Tq :])
        k = rope(k, cos, sin)
    if q.dtype == torch.float64:
        return attention_math(q, k, v, causal=causal, scale=scale)
    mask = None
    if causal and Tq == 1:
        causal = False  # one query, the last position: it sees every key, no mask to build
    elif causal and Tq != Tk:
        # SDPA's is_causal aligns the mask top-left; a cache needs bottom-right.
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, dropout_p=dropout_p
    )


def _cpu_flash_applies(q: torch.Tensor, k_len: int, dropout_p: float) -> bool:
    """The training-shaped case on CPU: fp32, no cache offset, no dropout."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-2] == k_len and dropout_p == 0.0


class _RopeFlashAttentionCPU(torch.autograd.Function):
    """Rotary + causal attention on CPU through ATen's flash kernel, with a lean backward.

    What plain autograd over apply_rope + SDPA costs, and this avoids: the rotated q and k
    are kept for backward (2 x B·H·T·D floats a layer; here q, k, v are saved as the views
    of the fused projection they are, and the rotation is redone in backward, two cheap
    passes), and the gradient of each rotated half goes back through cat/slice backward,
    which fills a zero tensor per half. The backward here is the flash backward and the
    inverse rotation (rope's transpose) of dq and dk. The output keeps the kernel's
    (B, T, H, D) memory layout, so `o.transpose(1, 2).reshape(B, T, C)` is free.
    """

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, causal, scale):
        if cos is not None:
            qr, kr = _rope_forward(q, cos, sin), _rope_forward(k, cos, sin)
        else:
            qr, kr = q, k
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qr, kr, v, 0.0, causal, scale=scale
        )
        ctx.save_for_backward(q, k, v, cos, sin, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, cos, sin, o, lse = ctx.saved_tensors
        if cos is not None:
            qr, kr = _rope_forward(q, cos, sin), _rope_forward(k, cos, sin)
        else:
            qr, kr = q, k
        if grad_o.stride(-1) != 1:  # other strides, stride 0 included, the kernel reads as they are
            grad_o = grad_o.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_o, qr, kr, v, o, lse, 0.0, ctx.causal, scale=ctx.scale
        )
        if cos is not None:
            dq, dk = _rope_forward(dq, cos, sin, inverse=True), _rope_forward(dk, cos, sin, inverse=True)
        return dq, dk, dv, None, None, None, None


def attention_math(q, k, v, *, causal=True, scale=None):
    """Explicit softmax attention (the float64 oracle; SDPA's math path in any dtype)."""
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:
        # Queries are the last T positions of the S keys (T < S when decoding with a cache).
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        att = att.masked_fill(~mask, float("-inf"))
    return torch.softmax(att, dim=-1) @ v


# ----------------------------------------------------------------------------- LayerNorm-GELU


def layer_norm(x, weight, bias=None, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layernorm_linear(x, ln_weight, ln_bias, weight, bias=None, *, activation=None, eps=1e-5):
    """act(layer_norm(x) @ weight^T + bias)."""
    y = F.linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias)
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    return y


# ----------------------------------------------------------------------------- cross-entropy


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """F.cross_entropy in fp32 statistics; "mean" over non-ignored targets (0 if none)."""
    # At least fp32 statistics, and float64 stays float64 (the oracle); F.cross_entropy
    # takes int64 targets only, while the op contract also admits int32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="none")
    return _reduce(loss, targets, ignore_index, reduction)


def _reduce(loss, targets, ignore_index, reduction):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    # clamp_min keeps an all-ignored batch at 0 instead of 0/0, without a host sync.
    count = (targets != ignore_index).sum().clamp_min(1)
    return total / count


def linear_cross_entropy_full(h, weight, targets, *, ignore_index=-100, reduction="mean"):
    """The oracle: full (N, V) logits, then cross-entropy."""
    return cross_entropy(h @ weight.t(), targets, ignore_index=ignore_index, reduction=reduction)


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


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, reduction="mean"):
    """cross_entropy(h @ weight^T, targets) without holding the full (N, V) logits."""
    if reduction == "none":
        return _ChunkedLinearCrossEntropyRows.apply(h, weight, targets, ignore_index)
    return _ChunkedLinearCrossEntropy.apply(
        h, weight, targets, ignore_index, reduction, torch.is_grad_enabled()
    )
