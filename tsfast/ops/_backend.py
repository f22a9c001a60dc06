"""Backend selection, shared by every op module: which backend runs a call, and the meter.

The backend comes from `tsfast.ops.use(...)` (a function and a context manager; `train.py
--kernels` calls it), else the environment variable TSFAST_KERNELS, else "auto":

- "torch": the op module's torch path, everywhere.
- "auto": on a CUDA device, the fastest of the op's candidates that can take the call
  (Triton kernels and plain-PyTorch ways), measured on first use (ops/selection.py); a call
  the kernels decline (a head dim they lack, say) is left to the torch candidates, with a
  one-time log line. CPU and MPS: the torch path, nothing measured.
- "triton": Triton, or a `BackendUnavailable` that names the reason and the fix. On CPU
  tensors the kernels run only under TRITON_INTERPRET=1 (Triton's slow interpreter).

torch.compile: `choose` (and `use_triton`) run as plain Python while tracing and are compiled
in as constants (select the backend before compiling; a later use() does not recompile).
Every candidate is traceable: the Triton paths are opaque `torch.library` custom ops
(docs/design.md, "Compile" and "Measured selection").
"""

from __future__ import annotations

import logging
import os

import torch

from tsfast import meter as _meter
from tsfast.flops import OpCost
from tsfast.ops import selection
from tsfast.ops._checks import dtype_name

log = logging.getLogger("tsfast.ops")

BACKENDS = ("auto", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """`--kernels triton` was asked for where the Triton kernels cannot run."""


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


def triton_missing() -> str | None:
    """Why `import triton` fails here, or None. Checked once, lazily (never at import)."""
    global _triton_import_error
    if _triton_import_error is False:
        try:
            import triton  # noqa: F401

            _triton_import_error = None
        except Exception as e:  # ImportError, or a broken install
            _triton_import_error = f"Triton does not import ({type(e).__name__}: {e})"
    return _triton_import_error


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_cannot_run(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors on `device` at all, or None."""
    missing = triton_missing()
    if missing:
        return f"{missing}. Install it (Linux: `uv sync`), or use --kernels torch|auto"
    if device.type == "cuda" or (device.type == "cpu" and interpreter_on()):
        return None
    fix = "use --kernels auto or torch (or TSFAST_KERNELS=torch)"
    if device.type == "cpu":
        fix += ", or set TRITON_INTERPRET=1 to run the kernels in Triton's slow CPU interpreter"
    return f"the tensors are on {device.type}, and the Triton kernels need a CUDA GPU: {fix}"


_logged_declines: set[tuple[str, str]] = set()


def use_triton(op: str, device: torch.device, declined: str | None = None) -> bool:
    """Whether this call of `op` runs on Triton. `declined` is why the kernel cannot take this
    particular call (None if it can): under "auto" such a call goes to torch (logged once),
    under "triton" it is a BackendUnavailable error."""
    chosen = get_backend()
    if chosen == "torch":
        return False
    if chosen == "auto":
        if device.type != "cuda" or triton_missing():
            return False
        if declined:
            if (op, declined) not in _logged_declines:
                _logged_declines.add((op, declined))
                log.warning("tsfast: %s runs on torch: %s", op, declined)
            return False
        return True
    cannot = triton_cannot_run(device)
    if cannot:
        raise BackendUnavailable(f"--kernels triton cannot run {op}: {cannot}")
    if declined:
        raise BackendUnavailable(
            f"--kernels triton cannot run this {op} call: {declined}. "
            "Use --kernels auto to send such calls to torch"
        )
    return True


# Dynamo calls use_triton while tracing and bakes its answer into the graph, instead of
# tracing through env reads, imports and logging (what torch.compiler.assume_constant_result
# sets; set directly because importing torch._dynamo at import time costs seconds).
use_triton._dynamo_marked_constant = True


def measures(device: torch.device) -> bool:
    """Whether calls on `device` are measured and the fastest candidate chosen: under auto,
    on a CUDA device, with Triton importable (its do_bench is the timer)."""
    return get_backend() == "auto" and device.type == "cuda" and not triton_missing()


def choose(family: selection.Family, device: torch.device, call: tuple, declined: str | None = None) -> str:
    """The name of the candidate of `family` that runs this call (`call`: the family's
    description of it, python constants only). --kernels torch / triton: that backend's
    first candidate (triton raises BackendUnavailable as use_triton does). auto on CUDA:
    the measured choice among the candidates that can take the call; elsewhere torch."""
    triton = use_triton(family.op, device, declined)
    if not measures(device):
        return family.default("triton" if triton else "torch").name
    allowed = tuple(c.name for c in family.candidates if triton or c.backend == "torch")
    if len(allowed) == 1:
        return allowed[0]
    autocast = autocast_dtype(device.type)
    return selection.current().pick(family, device, call, allowed, dtype_name(autocast) if autocast else None)


choose._dynamo_marked_constant = True  # as use_triton: evaluated while tracing, compiled in


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def dispatch(family: selection.Family, device: torch.device, call: tuple, declined: str | None,
             args: tuple, cost) -> torch.Tensor:
    """Run the candidate `choose` picks for this call on `args`; with a meter enabled (outside
    torch.compile), timed under family.op. `cost` is a zero-argument callable giving the
    call's OpCost (computed only when metered). Not itself a constant: only `choose` is
    compiled in, the call runs traced."""
    c = family.candidate(choose(family, device, call, declined))
    meter = _meter._active
    if meter is None or torch.compiler.is_compiling():
        return c.impl(*args)
    spent: OpCost = cost()
    return meter.time_call(family.op, c.name, spent, c.impl, args, {})


# Custom ops cannot return None: an absent tensor (no gradient asked for, no bias) travels as
# an empty one and turns back into None on the Python side.


def none_as_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def empty_as_none(t: torch.Tensor, wanted: bool = True) -> torch.Tensor | None:
    return t if wanted and t.numel() else None
