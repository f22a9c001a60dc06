"""Pure-PyTorch versions of every tsfast op: the CPU/MPS path and the test oracle.

Each function implements the contract in DESIGN.md exactly; `tsfast.ops` validates
arguments before calling here, so these functions assume well-formed inputs.

`linear_cross_entropy` is chunked over rows with its own autograd.Function, so the CPU/MPS
path never holds the full (N, V) logits either; `linear_cross_entropy_full` is the plain
full-logits formulation kept as the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------- rotary


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: (..., T, D); cos, sin: (T, D/2) fp32."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    c, s = cos.to(x1.dtype), sin.to(x1.dtype)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


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
    if cos is not None:
        q = apply_rope(q, cos[Tk - Tq :], sin[Tk - Tq :])
        k = apply_rope(k, cos, sin)
    if q.dtype == torch.float64:
        return attention_math(q, k, v, causal=causal, scale=scale)
    mask = None
    if causal and Tq != Tk:
        # SDPA's is_causal aligns the mask top-left; a cache needs bottom-right.
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, dropout_p=dropout_p
    )


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
    loss = F.cross_entropy(
        logits.float(), targets, ignore_index=ignore_index, reduction="none"
    )  # (N,), 0 at ignored rows
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


def _chunk_rows(n_rows: int, vocab: int, budget_elems: int = 2**23) -> int:
    """Rows per chunk so one chunk's fp32 logits stay near `budget_elems` (32 MiB)."""
    return max(1, min(n_rows, budget_elems // max(vocab, 1)))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked forward; backward only rescales them.

    Per chunk of rows: z = h_c @ W^T (fp32), p = softmax(z), loss_r = lse_r - z_r[t_r],
    dz = (p - onehot(t)) * w_r, dh_c = dz @ W, dW += dz^T @ h_c, where w_r is the row's
    weight in the reduction (1/count for "mean", 1 for "sum"/"none", 0 if ignored).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction):
        N, C = h.shape
        V = weight.shape[0]
        valid = targets != ignore_index
        if reduction == "mean":
            row_w = valid.float() / valid.sum().clamp_min(1)
        else:
            row_w = valid.float()
        safe_t = torch.where(valid, targets, 0)
        needs_grad = h.requires_grad or weight.requires_grad
        w32 = weight.float()
        loss = torch.empty(N, dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if needs_grad else None
        dW = torch.zeros(V, C, dtype=torch.float32, device=h.device) if needs_grad else None
        step = _chunk_rows(N, V)
        for s in range(0, N, step):
            e = min(s + step, N)
            hc = h[s:e].float()
            z = hc @ w32.t()  # (n, V)
            lse = torch.logsumexp(z, dim=-1)
            t = safe_t[s:e]
            loss[s:e] = (lse - z.gather(1, t[:, None]).squeeze(1)) * valid[s:e]
            if needs_grad:
                z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                z[torch.arange(e - s, device=z.device), t] -= 1.0
                z.mul_(row_w[s:e, None])
                dh[s:e] = (z @ w32).to(h.dtype)
                dW.addmm_(z.t(), hc)
        ctx.reduction = reduction
        if needs_grad:
            ctx.save_for_backward(dh, dW.to(weight.dtype), row_w)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total if reduction == "sum" else total * row_w.max()  # = total / count

    @staticmethod
    def backward(ctx, grad_out):
        dh, dW, row_w = ctx.saved_tensors
        g = grad_out.to(dh.dtype)
        return dh * g, dW * g.to(dW.dtype), None, None, None


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, reduction="mean"):
    """cross_entropy(h @ weight^T, targets) without holding the full (N, V) logits."""
    if reduction == "none":
        return _linear_cross_entropy_none(h, weight, targets, ignore_index)
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets, ignore_index, reduction)


def _linear_cross_entropy_none(h, weight, targets, ignore_index):
    """Per-row losses; each chunk's logits are recomputed in backward (checkpointed),
    because per-row upstream gradients cannot be folded into a forward-time dW."""

    def chunk_loss(hc, w, t):
        return cross_entropy(hc @ w.t(), t, ignore_index=ignore_index, reduction="none")

    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    step = _chunk_rows(h.shape[0], weight.shape[0])
    parts = []
    for s in range(0, h.shape[0], step):
        args = (h[s : s + step], weight, targets[s : s + step])
        if grad:
            parts.append(torch.utils.checkpoint.checkpoint(chunk_loss, *args, use_reentrant=False))
        else:
            parts.append(chunk_loss(*args))
    return torch.cat(parts)
