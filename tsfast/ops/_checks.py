"""Argument checks shared by the op modules: both backends reject bad input with the same
TypeError / ValueError, raised before either runs. Also the call-description helpers
(dtype name, gradient wanted) every op's dispatch uses."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64: torch backend only), got {t.dtype}")


def check_same(names: str, tensors, what: str = "dtype") -> None:
    values = {getattr(t, what) for t in tensors if t is not None}
    if len(values) > 1:
        got = ", ".join(f"{n}={getattr(t, what)}" for n, t in zip(names.split(","), tensors, strict=True) if t is not None)
        raise (TypeError if what == "dtype" else ValueError)(f"{names} must share one {what}: got {got}")


def check_vector(name: str, t, size: int, ref: torch.Tensor) -> None:
    if t is None:
        return
    check_float(name, t)
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}")


def check_targets(targets, n_rows: int, ref: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 (or int32) tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must have shape ({n_rows},) to match the input rows, got {tuple(targets.shape)}")
    if targets.device != ref.device:
        raise ValueError(f"targets are on {targets.device} but the input is on {ref.device}")


def check_target_range(targets, vocab: int, ignore_index: int) -> None:
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


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the form a call description and the selection cache use)."""
    return str(dtype).removeprefix("torch.")


def wants_grad(*tensors) -> bool:
    """Whether a gradient is wanted for any of `tensors` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def float64_declined(t: torch.Tensor) -> str | None:
    """float64 is the oracle's dtype: the kernels do not take it."""
    return "float64 runs on torch only" if t.dtype == torch.float64 else None
