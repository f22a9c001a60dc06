"""The dispatch layer: one function per op, each routed to Triton or to PyTorch per call.

Backend selection, in order of precedence: `tsfast.ops.use(...)` (a function and a context
manager; `train.py --kernels` calls it), then the environment variable TSFAST_KERNELS, then
"auto".

- "torch": always `tsfast.reference`.
- "auto": Triton when the call's tensors are on a CUDA device and Triton imports, else torch
  (CPU and MPS always torch). A call the Triton kernel does not support (a head dim it
  lacks, say) goes to torch with a one-time log line.
- "triton": Triton or a `BackendUnavailable` error that names the reason and the fix. On CPU
  tensors Triton runs only under TRITON_INTERPRET=1 (Triton's slow interpreter).

Arguments are validated here, before either backend runs, so both backends reject bad
input with the same `ValueError` / `TypeError`.

torch.compile: the backend choice is made while tracing and compiled in as a constant
(select the backend before compiling; a later use() does not recompile). The torch path
compiles without graph breaks; per-op metering (`tsfast.meter`) is skipped inside compiled
code, and so is the targets range check, which would need a host sync.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from tsfast import flops, reference
from tsfast import meter as _meter

log = logging.getLogger("tsfast.ops")

BACKENDS = ("auto", "triton", "torch")
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)  # what the Triton attention kernel compiles for
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "use",
    "get_backend",
    "backend_for",
    "rope_attention",
    "layernorm_linear",
    "layer_norm",
    "cross_entropy",
    "linear_cross_entropy",
]


class BackendUnavailable(RuntimeError):
    """`--kernels triton` was asked for where the Triton kernels cannot run."""


# ----------------------------------------------------------------------------- selection

_selected: str | None = None  # set by use(); None means "read TSFAST_KERNELS, else auto"


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend in force: use(...) if set, else $TSFAST_KERNELS, else "auto"."""
    if _selected is not None:
        return _selected
    env = os.environ.get("TSFAST_KERNELS", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"TSFAST_KERNELS={env!r} is not a backend: choose one of {', '.join(BACKENDS)}")
    return env


class use:
    """Select the kernel backend: `ops.use("triton")` for the rest of the process, or
    `with ops.use("torch"): ...` for a block (the previous choice comes back after it)."""

    def __init__(self, backend: str):
        global _selected
        self.backend = _check_backend(backend)
        self._previous = _selected
        _selected = self.backend

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _selected
        _selected = self._previous
        return False


_triton_import_error: str | None | bool = False  # False = not checked yet


def _triton_missing() -> str | None:
    """Why `import triton` fails here, or None. Checked once, lazily (never at import)."""
    global _triton_import_error
    if _triton_import_error is False:
        try:
            import triton  # noqa: F401

            _triton_import_error = None
        except Exception as e:  # ImportError, or a broken install
            _triton_import_error = f"Triton does not import ({type(e).__name__}: {e})"
    return _triton_import_error


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_cannot_run(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors on `device`, or None."""
    missing = _triton_missing()
    if missing:
        return f"{missing}. Install it (Linux: `uv sync`), or use --kernels torch|auto"
    if device.type == "cuda" or (device.type == "cpu" and _interpreter_on()):
        return None
    fix = "use --kernels auto or torch (or TSFAST_KERNELS=torch)"
    if device.type == "cpu":
        fix += ", or set TRITON_INTERPRET=1 to run the kernels in Triton's slow CPU interpreter"
    return f"the tensors are on {device.type}, and the Triton kernels need a CUDA GPU: {fix}"


_logged_fallbacks: set[tuple[str, str]] = set()


def backend_for(op: str, device: torch.device, unsupported: str | None = None,
                needs: tuple[tuple[str, str], ...] = ()) -> str:
    """The backend ("triton" or "torch") that runs this call of `op`.

    `unsupported` is why the Triton kernel cannot take this particular call (None if it can);
    `needs` holds (flag, reason) pairs: module-level flags the kernel module must set to True
    for this call, and why the call cannot run without each (read only once Triton is in play).
    """
    chosen = get_backend()
    if chosen == "torch":
        return "torch"
    if chosen == "auto":
        if device.type != "cuda" or _triton_missing():
            return "torch"
        reason = _kernel_missing(op) or unsupported or _lacking(op, needs)
        if reason:
            if (op, reason) not in _logged_fallbacks:
                _logged_fallbacks.add((op, reason))
                log.warning("tsfast: %s runs on torch: %s", op, reason)
            return "torch"
        return "triton"
    cannot = _triton_cannot_run(device) or _kernel_missing(op)
    if cannot:
        raise BackendUnavailable(f"--kernels triton cannot run {op}: {cannot}")
    unsupported = unsupported or _lacking(op, needs)
    if unsupported:
        raise BackendUnavailable(
            f"--kernels triton cannot run this {op} call: {unsupported}. "
            "Use --kernels auto to send such calls to torch"
        )
    return "triton"


# Dynamo calls backend_for while tracing and bakes its answer into the graph, instead of
# tracing through env reads, imports and logging (what torch.compiler.assume_constant_result
# sets; set directly because importing torch._dynamo at import time costs seconds).
backend_for._dynamo_marked_constant = True


# op name -> (module, function) of its Triton implementation
_TRITON_IMPL = {
    "rope_attention": ("tsfast.kernels.rope_attention", "rope_attention"),
    "layernorm_linear": ("tsfast.kernels.layernorm_gelu", "layernorm_linear"),
    "layer_norm": ("tsfast.kernels.layernorm_gelu", "layer_norm"),
    "cross_entropy": ("tsfast.kernels.cross_entropy", "cross_entropy"),
    "linear_cross_entropy": ("tsfast.kernels.cross_entropy", "linear_cross_entropy"),
}
_modules: dict[str, tuple[object, str | None]] = {}  # op -> (module or None, why missing)


def _load_kernel(op: str) -> tuple[object, str | None]:
    """The kernel module for `op`, imported on first use, or (None, the reason)."""
    if op not in _modules:
        name, attr = _TRITON_IMPL[op]
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name not in (name, "triton"):
                raise
            _modules[op] = (None, f"no Triton kernel for {op} yet ({name} does not exist)")
        except Exception as e:  # a kernel module that is there but broken
            _modules[op] = (None, f"{name} fails to import ({type(e).__name__}: {e})")
        else:
            missing = None if hasattr(mod, attr) else f"{name} defines no {attr}()"
            _modules[op] = (mod if missing is None else None, missing)
    return _modules[op]


def _lacking(op: str, needs: tuple[tuple[str, str], ...]) -> str | None:
    module = _kernel_module(op)
    return next((reason for flag, reason in needs if not getattr(module, flag, False)), None)


def _kernel_missing(op: str) -> str | None:
    return _load_kernel(op)[1]


def _kernel_module(op: str):
    return _load_kernel(op)[0]


def _triton(op: str):
    return getattr(_kernel_module(op), _TRITON_IMPL[op][1])


# op -> its cost formula in tsfast.flops (called only while a meter is enabled)
_COST = {
    "rope_attention": flops.rope_attention_cost,
    "layernorm_linear": flops.layernorm_linear_cost,
    "layer_norm": flops.layer_norm_cost,
    "cross_entropy": flops.cross_entropy_cost,
    "linear_cross_entropy": flops.linear_cross_entropy_cost,
}


# Under autocast, the Triton path does what autocast does to the torch path's matmuls: these
# arguments are cast to the autocast dtype (layer_norm and cross_entropy, which autocast
# keeps in fp32, are left alone) and the kernel runs with autocast off.
_AUTOCAST_ARGS = {
    "rope_attention": (0, 1, 2),  # q, k, v (cos and sin stay fp32)
    "layernorm_linear": (0, 1, 2, 3, 4),  # x, ln_weight, ln_bias, weight, bias
    "linear_cross_entropy": (0, 1),  # h, weight
}


def _under_autocast(op: str, kernel):
    """`kernel` wrapped to apply the autocast policy above, or `kernel` when it has none."""
    positions = _AUTOCAST_ARGS.get(op)
    if positions is None:
        return kernel

    def run(*args, **kwargs):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not torch.is_autocast_enabled(device_type):
            return kernel(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(a.to(dtype) if i in positions and isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args))
        with torch.autocast(device_type, enabled=False):
            return kernel(*args, **kwargs)

    return run


def _run(op: str, backend: str, args: tuple, kwargs: dict, cost_args: tuple, cost_kwargs=None):
    """Call the op on `backend`; with a meter enabled (outside torch.compile), time it."""
    impl = _under_autocast(op, _triton(op)) if backend == "triton" else getattr(reference, op)
    meter = _meter._active
    if meter is None or torch.compiler.is_compiling():
        return impl(*args, **kwargs)
    cost = _COST[op](*cost_args, **(cost_kwargs or {}))
    return meter.time_call(op, backend, cost, impl, args, kwargs)


# ----------------------------------------------------------------------------- validation


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64: torch backend only), got {t.dtype}")


def _check_same(names: str, tensors, what: str = "dtype") -> None:
    values = {getattr(t, what) for t in tensors if t is not None}
    if len(values) > 1:
        got = ", ".join(f"{n}={getattr(t, what)}" for n, t in zip(names.split(","), tensors, strict=True) if t is not None)
        raise (TypeError if what == "dtype" else ValueError)(f"{names} must share one {what}: got {got}")


def _check_vector(name: str, t, size: int, ref: torch.Tensor) -> None:
    if t is None:
        return
    _check_float(name, t)
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}")


def _check_targets(targets, n_rows: int, ref: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 (or int32) tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must have shape ({n_rows},) to match the input rows, got {tuple(targets.shape)}")
    if targets.device != ref.device:
        raise ValueError(f"targets are on {targets.device} but the input is on {ref.device}")


def _check_target_range(targets, vocab: int, ignore_index: int) -> None:
    """Out-of-range targets: checked on CPU only, where it costs no device sync, and not
    while torch.compile traces (the check reads values, which would break the graph)."""
    if targets.device.type != "cpu" or not targets.numel() or torch.compiler.is_compiling():
        return
    valid = targets[targets != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(
            f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"got values in [{int(valid.min())}, {int(valid.max())}]"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _float64_unsupported(t: torch.Tensor) -> str | None:
    return "float64 runs on torch only (it is the test oracle)" if t.dtype == torch.float64 else None


# ----------------------------------------------------------------------------- ops


def rope_attention(q, k, v, cos=None, sin=None, *, causal=True, scale=None, dropout_p=0.0):
    """o = softmax(rope(q) @ rope(k)^T * scale + causal mask) @ v.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) (Tq < Tk: decoding with a KV cache, the queries
    being the last Tq positions); one dtype, last dim contiguous. cos, sin: (Tk, D/2)
    float32, or both None (no rotary). Returns (B, H, Tq, D) in q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    _check_same("q,k,v", (q, k, v), "dtype")
    _check_same("q,k,v", (q, k, v), "device")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    T_k = k.shape[2]
    if T > T_k and (causal or cos is not None):
        # Queries are the last T_q of the T_k positions (a KV cache), so there cannot be more.
        raise ValueError(f"causal or rotary attention needs T_q <= T_k, got T_q={T} > T_k={T_k}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if D % 2 or D < 2:
        raise ValueError(f"head dim D must be even (rotate-half rotary), got D={D}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.shape != (T_k, D // 2):
                raise ValueError(f"{name} must have shape (T_k, D/2) = ({T_k}, {D // 2}), got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    unsupported = _float64_unsupported(q)
    if D not in ATTENTION_HEAD_DIMS:
        unsupported = f"head dim {D} is not one of {ATTENTION_HEAD_DIMS}"
    elif T != T_k:
        unsupported = "query and key lengths differ (KV-cache decoding)"
    needs = (("SUPPORTS_DROPOUT", "attention dropout is not implemented in the kernel"),) if dropout_p > 0 else ()
    backend = backend_for("rope_attention", q.device, unsupported, needs)
    return _run("rope_attention", backend, (q, k, v, cos, sin),
                dict(causal=causal, scale=scale, dropout_p=dropout_p),
                (B, H, T, D), dict(causal=causal, k_len=T_k))


def _check_layernorm_args(x, ln_weight, ln_bias, eps):
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (..., C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    _check_vector("ln_weight", ln_weight, C, x)
    _check_vector("ln_bias", ln_bias, C, x)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def layer_norm(x, weight, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x (..., C); weight, bias: (C,)."""
    _check_layernorm_args(x, weight, bias, eps)
    _check_same("x,weight,bias", (x, weight, bias), "dtype")
    backend = backend_for("layer_norm", x.device, _float64_unsupported(x))
    C = x.shape[-1]
    return _run("layer_norm", backend, (x, weight, bias, eps), {},
                (x.numel() // C, C, x.element_size()))


def layernorm_linear(x, ln_weight, ln_bias, weight, bias=None, *, activation=None, eps=1e-5):
    """y = act(layer_norm(x) @ weight^T + bias); x: (..., C), weight: (F, C), bias: (F,)."""
    _check_layernorm_args(x, ln_weight, ln_bias, eps)
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (F, C={x.shape[-1]}), got {tuple(weight.shape)}")
    _check_vector("bias", bias, weight.shape[0], x)
    _check_same("x,ln_weight,ln_bias,weight,bias", (x, ln_weight, ln_bias, weight, bias), "dtype")
    _check_same("x,weight", (x, weight), "device")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    backend = backend_for("layernorm_linear", x.device, _float64_unsupported(x))
    C, F = weight.shape[1], weight.shape[0]
    return _run("layernorm_linear", backend, (x, ln_weight, ln_bias, weight, bias),
                dict(activation=activation, eps=eps), (x.numel() // C, C, F))


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """Cross-entropy of logits (N, V) against int targets (N,); "mean" over non-ignored."""
    _check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[0], logits)
    _check_target_range(targets, logits.shape[1], ignore_index)
    _check_reduction(reduction)
    backend = backend_for("cross_entropy", logits.device, _float64_unsupported(logits))
    N, V = logits.shape
    return _run("cross_entropy", backend, (logits, targets),
                dict(ignore_index=ignore_index, reduction=reduction), (N, V, logits.element_size()))


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, reduction="mean"):
    """cross_entropy(h @ weight^T, targets) without ever holding the full (N, V) logits.

    h: (N, C); weight: (V, C); targets: (N,).
    """
    _check_float("h", h)
    _check_float("weight", weight)
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D (N, C), got shape {tuple(h.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must have shape (V, C={h.shape[1]}), got {tuple(weight.shape)}")
    _check_same("h,weight", (h, weight), "dtype")
    _check_same("h,weight", (h, weight), "device")
    _check_targets(targets, h.shape[0], h)
    _check_target_range(targets, weight.shape[0], ignore_index)
    _check_reduction(reduction)
    backend = backend_for("linear_cross_entropy", h.device, _float64_unsupported(h))
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _run("linear_cross_entropy", backend, (h, weight, targets),
                dict(ignore_index=ignore_index, reduction=reduction),
                (h.shape[0], h.shape[1], weight.shape[0]), dict(with_grad=with_grad))
