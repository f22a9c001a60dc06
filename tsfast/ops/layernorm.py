"""layernorm_linear and layer_norm: LayerNorm fused into the matmul that follows it
(docs/design.md).

Contract (both backends):

    layernorm_linear(x, ln_weight, ln_bias, weight, bias=None, *, activation=None, eps=1e-5)
        y = act(layer_norm(x) @ weight^T + bias)       x: (..., C) -> y: (..., F)
    layer_norm(x, weight, bias=None, eps=1e-5)         LayerNorm over the last dim

ln_weight, ln_bias: (C,) (ln_bias may be None); weight: (F, C); bias: (F,) or None;
activation: None or "gelu_tanh" (GPT-2's GELU). Gradients for x and every parameter.

Numerics: the LayerNorm mean and rstd in fp32, products accumulated in fp32. Under autocast
these ops do what torch's autocast does to F.layer_norm + F.linear: the LayerNorm (x,
ln_weight, ln_bias) runs in fp32 and its gradients come back in each input's own dtype; the
matmul takes weight and bias in the autocast dtype and so returns y in it. layer_norm alone
is fp32 under autocast.

Backends: torch is F.layer_norm, F.linear, F.gelu. Triton is tsfast/kernels/layernorm_gelu.py
(+ layernorm_gelu_backward.py): the forward normalises A tiles as they load (no normalised
copy of x in memory) with bias and GELU in the epilogue; registered below as custom ops.

Cost: a linear's 2·N·C·F FLOPs forward and twice that backward (dX and dW); layer_norm is
memory-bound and counted in bytes moved, each tensor read or written once.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from tsfast.flops import OpCost, linear_flops
from tsfast.ops import _backend
from tsfast.ops._backend import empty_as_none as _or_none
from tsfast.ops._backend import none_as_empty as _or_empty
from tsfast.ops._checks import (
    check_float,
    check_same,
    check_vector,
    dtype_name,
    float64_declined,
    wants_grad,
)
from tsfast.ops.selection import Candidate, Family

ACTIVATIONS = (None, "gelu_tanh")


# ----------------------------------------------------------------------------- cost


def layernorm_linear_cost(rows: int, in_features: int, out_features: int) -> OpCost:
    fwd = linear_flops(rows, in_features, out_features)
    return OpCost(fwd, 2 * fwd, "tflops")


def layer_norm_cost(rows: int, width: int, elem_bytes: int) -> OpCost:
    """Forward reads x and the two (C,) parameters and writes y plus fp32 mean/rstd per row;
    backward reads x, dy, mean/rstd, the weight and writes dx, dweight, dbias."""
    x = rows * width * elem_bytes
    params = 2 * width * elem_bytes
    stats = 2 * rows * 4
    return OpCost(2 * x + params + stats, 3 * x + stats + 3 * params, "gbps")


# ----------------------------------------------------------------------------- validation


def _validate_norm(x, ln_weight, ln_bias, eps) -> None:
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (..., C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    check_vector("ln_weight", ln_weight, C, x)
    check_vector("ln_bias", ln_bias, C, x)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


# ----------------------------------------------------------------------------- torch path


def _layernorm_linear_torch(x, ln_weight, ln_bias, weight, bias, activation, eps):
    y = F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


def _layer_norm_torch(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------- Triton path
# Custom ops take rows as contiguous (N, C) matrices; a None that a custom op cannot return
# travels as an empty tensor.


def _kernels():
    from tsfast.kernels import layernorm_gelu

    return layernorm_gelu




@torch.library.custom_op("tsfast::layernorm_linear_fwd", mutates_args=())
def _ln_linear_fwd(x2: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor | None,
                   weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool, eps: float,
                   variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd, pre = _kernels().layernorm_linear_forward(
        x2, ln_weight, ln_bias, weight, bias, activation="gelu_tanh" if gelu else None, eps=eps)
    return y, mean, rstd, _or_empty(pre, y)


@_ln_linear_fwd.register_fake
def _(x2, ln_weight, ln_bias, weight, bias, gelu, eps, variant):
    N, F_ = x2.shape[0], weight.shape[0]
    y = x2.new_empty(N, F_, dtype=weight.dtype)
    stats = x2.new_empty(N, dtype=torch.float32)
    return y, stats, stats.clone(), (y.new_empty(N, F_) if gelu else y.new_empty(0))


@torch.library.custom_op("tsfast::layernorm_linear_bwd", mutates_args=())
def _ln_linear_bwd(dy2: torch.Tensor, x2: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   ln_weight: torch.Tensor, ln_bias: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, pre: torch.Tensor, input_grads: bool, weight_grads: bool,
                   variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _kernels().layernorm_linear_backward(
        dy2, x2, mean, rstd, ln_weight, ln_bias, weight, _or_none(pre), bias=bias,
        input_grads=input_grads, weight_grads=weight_grads, variant=variant)
    return tuple(_or_empty(g, x2) for g in grads)


@_ln_linear_bwd.register_fake
def _(dy2, x2, mean, rstd, ln_weight, ln_bias, weight, bias, pre, input_grads, weight_grads, variant):
    def like(t, wanted):
        return t.new_empty(t.shape) if wanted and t is not None else x2.new_empty(0)

    return (like(x2, input_grads), like(ln_weight, input_grads), like(ln_bias, input_grads),
            like(weight, weight_grads), like(bias, weight_grads))


def _ln_linear_setup(ctx, inputs, output):
    x2, ln_weight, ln_bias, weight, bias, gelu, eps, variant = inputs
    _, mean, rstd, pre = output
    ctx.save_for_backward(x2, mean, rstd, ln_weight, ln_bias, weight, bias, pre)
    ctx.variant = variant


def _ln_linear_backward(ctx, dy, _dmean, _drstd, _dpre):
    x2, mean, rstd, ln_weight, ln_bias, weight, bias, pre = ctx.saved_tensors
    need = ctx.needs_input_grad
    input_grads, weight_grads = any(need[:3]), any(need[3:5])
    grads = _ln_linear_bwd(dy, x2, mean, rstd, ln_weight, ln_bias, weight, bias, pre, input_grads, weight_grads,
                           ctx.variant)
    return (*(_or_none(g, n) for g, n in zip(grads, need[:5], strict=True)), None, None, None)


_ln_linear_fwd.register_autograd(_ln_linear_backward, setup_context=_ln_linear_setup)


@torch.library.custom_op("tsfast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x2.shape[0] == 0:
        stats = x2.new_empty(0, dtype=torch.float32)
        return torch.empty_like(x2), stats, stats.clone()
    return _kernels().layer_norm_forward(x2, weight, bias, eps)


@_layer_norm_fwd.register_fake
def _(x2, weight, bias, eps):
    stats = x2.new_empty(x2.shape[0], dtype=torch.float32)
    return torch.empty_like(x2), stats, stats.clone()


@torch.library.custom_op("tsfast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x2.shape[0] == 0:
        return torch.zeros_like(x2), torch.zeros_like(weight), _or_empty(None if bias is None else torch.zeros_like(bias), x2)
    dx, dgamma, dbeta, _ = _kernels().layer_norm_backward(x2, dy2, weight, bias, mean, rstd)
    return dx, dgamma, _or_empty(dbeta, x2)


@_layer_norm_bwd.register_fake
def _(dy2, x2, weight, bias, mean, rstd):
    return torch.empty_like(x2), torch.empty_like(weight), (x2.new_empty(0) if bias is None else torch.empty_like(bias))


def _layer_norm_setup(ctx, inputs, output):
    x2, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x2, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x2, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dgamma, dbeta = _layer_norm_bwd(dy.contiguous(), x2, weight, bias, mean, rstd)
    return dx, dgamma, _or_none(dbeta), None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _to(t, dtype):
    return None if t is None else t.to(dtype)


def _layernorm_linear_triton(x, ln_weight, ln_bias, weight, bias, activation, eps, *, backward="dpre"):
    dtype = _backend.autocast_dtype(x.device.type)
    if dtype is not None:  # autocast: LayerNorm in fp32, the matmul in the autocast dtype
        x, ln_weight, ln_bias = x.float(), ln_weight.float(), _to(ln_bias, torch.float32)
        weight, bias = weight.to(dtype), _to(bias, dtype)
    C = x.shape[-1]
    y = _ln_linear_fwd(x.reshape(-1, C).contiguous(), ln_weight.contiguous(), _contiguous(ln_bias),
                       weight.contiguous(), _contiguous(bias), activation == "gelu_tanh", float(eps), backward)[0]
    return y.view(*x.shape[:-1], weight.shape[0])


def _layer_norm_triton(x, weight, bias, eps):
    if _backend.autocast_dtype(x.device.type) is not None:  # autocast runs LayerNorm in fp32
        x, weight, bias = x.float(), weight.float(), _to(bias, torch.float32)
    y = _layer_norm_fwd(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), _contiguous(bias), float(eps))[0]
    return y.view(x.shape)


# ----------------------------------------------------------------------------- candidates
# Under --kernels auto on CUDA the fastest of each family runs (ops/selection.py); the first
# of each backend is what --kernels triton / torch run.


def _random(g, device, dtype, *shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g, device=device) * scale + shift).to(getattr(torch, dtype))


def _linear_bench_inputs(call, device):
    N, C, F_, activation, ln_bias, bias, dtype, grad = call
    g = torch.Generator(device=device).manual_seed(0)
    x = _random(g, device, dtype, N, C, scale=2.0, shift=0.5)
    lw = _random(g, device, dtype, C, scale=0.2, shift=1.0)
    lb = _random(g, device, dtype, C, scale=0.2) if ln_bias else None
    w = _random(g, device, dtype, F_, C, scale=C**-0.5)
    b = _random(g, device, dtype, F_, scale=0.2) if bias else None
    leaves = [t.requires_grad_(grad) for t in (x, lw, lb, w, b) if t is not None]
    return (x, lw, lb, w, b, activation, 1e-5), (leaves if grad else [])


def _norm_bench_inputs(call, device):
    N, C, bias, dtype, grad = call
    g = torch.Generator(device=device).manual_seed(0)
    x = _random(g, device, dtype, N, C, scale=2.0, shift=0.5).requires_grad_(grad)
    w = _random(g, device, dtype, C, scale=0.2, shift=1.0).requires_grad_(grad)
    b = _random(g, device, dtype, C, scale=0.2).requires_grad_(grad) if bias else None
    return (x, w, b, 1e-5), ([t for t in (x, w, b) if t is not None] if grad else [])


LAYERNORM_LINEAR = Family(
    "layernorm_linear",
    (
        # backward: dPre = dy * GELU'(pre) written once, then two cuBLAS GEMMs
        Candidate("triton", "triton", _layernorm_linear_triton),
        # backward: GELU' recomputed in the prologue of both gradient matmuls (nothing stored)
        Candidate("triton_prologue", "triton", partial(_layernorm_linear_triton, backward="prologue")),
        Candidate("torch", "torch", _layernorm_linear_torch),  # F.layer_norm, cuBLAS F.linear, F.gelu
    ),
    fields=("N", "C", "F", "act", "ln_bias", "bias", "dtype", "grad"),
    bucketed=("N",),
    bench_inputs=_linear_bench_inputs,
)

LAYER_NORM = Family(
    "layer_norm",
    (Candidate("triton", "triton", _layer_norm_triton), Candidate("torch", "torch", _layer_norm_torch)),
    fields=("N", "C", "bias", "dtype", "grad"),
    bucketed=("N",),
    bench_inputs=_norm_bench_inputs,
)


# ----------------------------------------------------------------------------- the ops


def layernorm_linear(x, ln_weight, ln_bias, weight, bias=None, *, activation=None, eps=1e-5):
    """y = act(layer_norm(x) @ weight^T + bias); x: (..., C), weight: (F, C), bias: (F,)."""
    _validate_norm(x, ln_weight, ln_bias, eps)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (F, C={x.shape[-1]}), got {tuple(weight.shape)}")
    check_vector("bias", bias, weight.shape[0], x)
    check_same("x,ln_weight,ln_bias,weight,bias", (x, ln_weight, ln_bias, weight, bias), "dtype")
    check_same("x,weight", (x, weight), "device")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    C, F_ = weight.shape[1], weight.shape[0]
    call = (x.numel() // C, C, F_, activation, ln_bias is not None, bias is not None, dtype_name(x.dtype),
            wants_grad(x, ln_weight, ln_bias, weight, bias))
    return _backend.dispatch(LAYERNORM_LINEAR, x.device, call, float64_declined(x),
                             (x, ln_weight, ln_bias, weight, bias, activation, eps),
                             lambda: layernorm_linear_cost(x.numel() // C, C, F_))


def layer_norm(x, weight, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x (..., C); weight, bias: (C,)."""
    _validate_norm(x, weight, bias, eps)
    check_same("x,weight,bias", (x, weight, bias), "dtype")
    C = x.shape[-1]
    call = (x.numel() // C, C, bias is not None, dtype_name(x.dtype), wants_grad(x, weight, bias))
    return _backend.dispatch(LAYER_NORM, x.device, call, float64_declined(x), (x, weight, bias, eps),
                             lambda: layer_norm_cost(x.numel() // C, C, x.element_size()))
