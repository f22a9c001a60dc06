"""cross_entropy and linear_cross_entropy (docs/design.md).

Contract (both backends):

    cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean") -> loss
    linear_cross_entropy(h, weight, targets, *, ignore_index=-100, reduction="mean") -> loss
        = cross_entropy(h @ weight^T, targets), without the full (N, V) logits in memory
          (the one exception, chosen only by measurement, is below)

logits: (N, V); h: (N, C); weight: (V, C); targets: (N,) int64/int32, an entry equal to
ignore_index contributes nothing. reduction: "mean" (over non-ignored targets; 0 when all are
ignored), "sum" or "none" (per-row losses). The loss is fp32 (float64 for float64 inputs);
no host sync inside.

Numerics: log-sum-exp statistics in fp32 (the row's max and the sum of exponentials kept
apart). Under autocast the fused op's matmul takes h and weight in the autocast dtype (as
autocast does to a matmul); cross_entropy is fp32 as autocast makes it.

Gradient work happens only when a gradient is wanted: under no_grad / inference_mode, or
for inputs that do not require grad, neither backend computes or allocates one.

Backends: torch chunks rows so that one (rows, V) fp32 logits buffer of at most CHUNK_BYTES
is reused (three GEMMs a chunk, the gradients computed in the forward). Triton is
tsfast/kernels/cross_entropy.py: a one-pass online-softmax row kernel, cuBLAS for the
matmuls, registered below as custom ops. A third candidate, "torch_full" (F.linear then
F.cross_entropy on the full logits), runs only when --kernels auto measured it fastest on a
CUDA GPU and its logits fit in half the free memory (ops/selection.py); the memory promise
above holds for everything --kernels triton or torch runs.

Cost: cross_entropy is memory-bound and counted in bytes; linear_cross_entropy computes its
gradients in the forward: 2·N·C·V FLOPs for the logits plus 4·N·C·V for dh and dW when
gradients are wanted; its backward only rescales (0 FLOPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsfast.flops import OpCost, linear_flops
from tsfast.ops import _backend
from tsfast.ops._backend import empty_as_none as _or_none
from tsfast.ops._backend import none_as_empty as _or_empty
from tsfast.ops._checks import (
    check_float,
    check_reduction,
    check_same,
    check_target_range,
    check_targets,
    dtype_name,
    float64_declined,
    wants_grad,
)
from tsfast.ops._chunked_loss import linear_cross_entropy_chunked, reduce_rows
from tsfast.ops.selection import Candidate, Family

# ----------------------------------------------------------------------------- cost


def cross_entropy_cost(rows: int, vocab: int, elem_bytes: int) -> OpCost:
    """Forward reads the logits and int64 targets and writes an fp32 loss per row; backward
    reads the logits again (with the saved fp32 log-sum-exp) and writes dlogits."""
    logits = rows * vocab * elem_bytes
    per_row = rows * (8 + 4)
    return OpCost(logits + per_row, 2 * logits + per_row, "gbps")


def linear_cross_entropy_cost(rows: int, width: int, vocab: int, *, with_grad: bool) -> OpCost:
    logits = linear_flops(rows, width, vocab)
    return OpCost(logits + (2 * logits if with_grad else 0.0), 0.0, "tflops")


# ----------------------------------------------------------------------------- torch path


def _cross_entropy_torch(logits, targets, ignore_index, reduction):
    # At least fp32 statistics, and float64 stays float64 (the oracle's dtype); F.cross_entropy
    # takes int64 targets only, while the op contract also admits int32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="none")
    return reduce_rows(loss, targets, ignore_index, reduction)


def _linear_cross_entropy_torch(h, weight, targets, ignore_index, reduction):
    dtype = _backend.autocast_dtype(h.device.type)
    if dtype is None:
        return linear_cross_entropy_chunked(h, weight, targets, ignore_index, reduction)
    # What autocast does to the logits matmul, made explicit: the chunk loop writes into its
    # own buffers (out=), which autocast does not take.
    with torch.autocast(h.device.type, enabled=False):
        return linear_cross_entropy_chunked(h.to(dtype), weight.to(dtype), targets, ignore_index, reduction)


def _linear_cross_entropy_full(h, weight, targets, ignore_index, reduction):
    """The plain way, a candidate on GPUs: the full (N, V) logits from one cuBLAS GEMM, then
    F.cross_entropy (autocast applies to both as it would to F.linear + F.cross_entropy)."""
    return _cross_entropy_torch(F.linear(h, weight), targets, ignore_index, reduction)


# Bytes per logit the full-logits way holds at its peak: the logits (bf16 under autocast),
# their fp32 copy for the loss, and the fp32 gradient with its cast back; 12 is a round bound.
FULL_LOGITS_BYTES = 12


def _full_logits_fits(call, free_bytes: int | None) -> str | None:
    """The full logits may take at most half the free device memory (the rest of the step's
    activations are still live when the loss runs)."""
    N, C, V = call[:3]
    need = FULL_LOGITS_BYTES * N * V
    if free_bytes is not None and need > free_bytes // 2:
        return f"the full logits need ~{need / 2**30:.1f} GiB, over half of the {free_bytes / 2**30:.1f} GiB free"
    return None


# ----------------------------------------------------------------------------- Triton path
# A None that a custom op cannot return travels as an empty tensor.


def _kernels():
    from tsfast.kernels import cross_entropy

    return cross_entropy




@torch.library.custom_op("tsfast::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().cross_entropy_forward(logits, targets, ignore_index, reduction)


@_ce_fwd.register_fake
def _(logits, targets, ignore_index, reduction):
    N = logits.shape[0]
    loss = logits.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty(N, 2, dtype=torch.float32), logits.new_empty((), dtype=torch.float32)


@torch.library.custom_op("tsfast::cross_entropy_bwd", mutates_args=())
def _ce_bwd(grad_out: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
            row_scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return _kernels().cross_entropy_backward(grad_out, logits, targets, stats, row_scale, ignore_index)


@_ce_bwd.register_fake
def _(grad_out, logits, targets, stats, row_scale, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup(ctx, inputs, output):
    logits, targets, ignore_index, reduction = inputs
    _, stats, row_scale = output
    ctx.save_for_backward(logits, targets, stats, row_scale)
    ctx.ignore_index = ignore_index


def _ce_backward(ctx, grad_out, _dstats, _drow_scale):
    logits, targets, stats, row_scale = ctx.saved_tensors
    return _ce_bwd(grad_out, logits, targets, stats, row_scale, ctx.ignore_index), None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


@torch.library.custom_op("tsfast::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             reduction: str, want_dh: bool,
             want_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, stats, row_scale, dh, dw = _kernels().linear_cross_entropy_forward(
        h, weight, targets, ignore_index, reduction, want_dh=want_dh, want_dw=want_dw)
    if dw is not None:
        dw = dw.to(weight.dtype)
    return loss, stats, row_scale, _or_empty(dh, h), _or_empty(dw, h)


@_lce_fwd.register_fake
def _(h, weight, targets, ignore_index, reduction, want_dh, want_dw):
    N = h.shape[0]
    in_forward = reduction != "none"
    loss = h.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    dh = h.new_empty(h.shape) if want_dh and in_forward else h.new_empty(0)
    dw = weight.new_empty(weight.shape) if want_dw and in_forward else h.new_empty(0)
    return loss, h.new_empty(N, 2, dtype=torch.float32), h.new_empty((), dtype=torch.float32), dh, dw


@torch.library.custom_op("tsfast::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(grad_rows: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             stats: torch.Tensor, row_scale: torch.Tensor, ignore_index: int, want_dh: bool,
             want_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dh, dw = _kernels().linear_cross_entropy_backward(
        grad_rows, h, weight, targets, stats, row_scale, ignore_index, want_dh=want_dh, want_dw=want_dw)
    return _or_empty(dh, h), _or_empty(None if dw is None else dw.to(weight.dtype), h)


@_lce_bwd.register_fake
def _(grad_rows, h, weight, targets, stats, row_scale, ignore_index, want_dh, want_dw):
    return (h.new_empty(h.shape) if want_dh else h.new_empty(0),
            weight.new_empty(weight.shape) if want_dw else h.new_empty(0))


def _lce_setup(ctx, inputs, output):
    h, weight, targets, ignore_index, reduction, want_dh, want_dw = inputs
    _, stats, row_scale, dh, dw = output
    ctx.reduction, ctx.ignore_index = reduction, ignore_index
    ctx.want = (want_dh, want_dw)
    if reduction == "none":
        ctx.save_for_backward(h, weight, targets, stats, row_scale)
    else:
        ctx.save_for_backward(dh, dw)


def _lce_backward(ctx, grad_out, *_):
    if ctx.reduction != "none":  # the gradients were computed in the forward: rescale them
        dh, dw = ctx.saved_tensors
        grads = [None if g.numel() == 0 else g * grad_out.to(g.dtype) for g in (dh, dw)]
    else:
        h, weight, targets, stats, row_scale = ctx.saved_tensors
        grads = [_or_none(g) for g in _lce_bwd(grad_out, h, weight, targets, stats, row_scale,
                                               ctx.ignore_index, *ctx.want)]
    return (*grads, None, None, None, None, None)


_lce_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


def _cross_entropy_triton(logits, targets, ignore_index, reduction):
    return _ce_fwd(logits, targets, ignore_index, reduction)[0]


def _linear_cross_entropy_triton(h, weight, targets, ignore_index, reduction):
    dtype = _backend.autocast_dtype(h.device.type)
    if dtype is not None:  # what autocast does to the logits matmul
        h, weight = h.to(dtype), weight.to(dtype)
    # ctx.needs_input_grad ignores grad mode: ask here
    return _lce_fwd(h, weight, targets, ignore_index, reduction, wants_grad(h), wants_grad(weight))[0]


# ----------------------------------------------------------------------------- candidates
# Under --kernels auto on CUDA the fastest of each family runs (ops/selection.py); the first
# of each backend is what --kernels triton / torch run.


def _targets(g, device, N: int, V: int) -> torch.Tensor:
    t = torch.randint(0, V, (N,), generator=g, device=device)
    return t.masked_fill(torch.rand(N, generator=g, device=device) < 0.05, -100)


def _ce_bench_inputs(call, device):
    N, V, reduction, dtype, grad = call
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(N, V, generator=g, device=device) * 2).to(getattr(torch, dtype)).requires_grad_(grad)
    return (logits, _targets(g, device, N, V), -100, reduction), ([logits] if grad else [])


def _lce_bench_inputs(call, device):
    N, C, V, reduction, dtype, grad = call
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, C, generator=g, device=device).to(getattr(torch, dtype)).requires_grad_(grad)
    w = (torch.randn(V, C, generator=g, device=device) * C**-0.5).to(getattr(torch, dtype)).requires_grad_(grad)
    return (h, w, _targets(g, device, N, V), -100, reduction), ([h, w] if grad else [])


CROSS_ENTROPY = Family(
    "cross_entropy",
    (Candidate("triton", "triton", _cross_entropy_triton), Candidate("torch", "torch", _cross_entropy_torch)),
    fields=("N", "V", "reduction", "dtype", "grad"),
    bucketed=("N",),
    bench_inputs=_ce_bench_inputs,
)

LINEAR_CROSS_ENTROPY = Family(
    "linear_cross_entropy",
    (
        Candidate("triton", "triton", _linear_cross_entropy_triton),
        Candidate("torch", "torch", _linear_cross_entropy_torch),  # chunked rows (CPU/MPS default)
        Candidate("torch_full", "torch", _linear_cross_entropy_full, fits=_full_logits_fits),
    ),
    fields=("N", "C", "V", "reduction", "dtype", "grad"),
    bucketed=("N",),
    bench_inputs=_lce_bench_inputs,
)


# ----------------------------------------------------------------------------- the ops


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """Cross-entropy of logits (N, V) against int targets (N,); "mean" over non-ignored."""
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    check_targets(targets, logits.shape[0], logits)
    check_target_range(targets, logits.shape[1], ignore_index)
    check_reduction(reduction)
    N, V = logits.shape
    call = (N, V, reduction, dtype_name(logits.dtype), wants_grad(logits))
    return _backend.dispatch(CROSS_ENTROPY, logits.device, call, float64_declined(logits),
                             (logits, targets, ignore_index, reduction),
                             lambda: cross_entropy_cost(N, V, logits.element_size()))


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, reduction="mean"):
    """cross_entropy(h @ weight^T, targets) without ever holding the full (N, V) logits.

    h: (N, C); weight: (V, C); targets: (N,)."""
    check_float("h", h)
    check_float("weight", weight)
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D (N, C), got shape {tuple(h.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must have shape (V, C={h.shape[1]}), got {tuple(weight.shape)}")
    check_same("h,weight", (h, weight), "dtype")
    check_same("h,weight", (h, weight), "device")
    check_targets(targets, h.shape[0], h)
    check_target_range(targets, weight.shape[0], ignore_index)
    check_reduction(reduction)
    with_grad = wants_grad(h, weight)
    call = (h.shape[0], h.shape[1], weight.shape[0], reduction, dtype_name(h.dtype), with_grad)
    return _backend.dispatch(LINEAR_CROSS_ENTROPY, h.device, call, float64_declined(h),
                             (h, weight, targets, ignore_index, reduction),
                             lambda: linear_cross_entropy_cost(h.shape[0], h.shape[1], weight.shape[0], with_grad=with_grad))
