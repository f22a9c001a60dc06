"""The per-op meter: how long each tsfast op takes, forward and backward, and at what rate.

    meter = tsfast.meter.enable()
    ... train for a log interval ...
    for line in meter.lines(interval_seconds):
        print(line)
    wandb.log(meter.metrics(interval_seconds))
    meter.reset()

While a meter is enabled, `tsfast.ops` times every op call (except inside torch.compile'd
code, where per-op timing would split the graph):
- forward: a timestamp before and after the call;
- backward: two identity autograd.Functions, one on the op's output and one on its inputs;
  the first's backward runs when the output's gradient arrives (start), the second's when
  the op's backward has produced the input gradients (end).
On CUDA the timestamps are CUDA events, recorded without synchronizing and resolved when
lines() or metrics() is called; elsewhere they are wall-clock times (CPU ops are synchronous;
MPS is synchronized first). When no meter is enabled the ops pay one global check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tsfast.flops import OpCost

__all__ = ["OpMeter", "enable", "disable", "active"]

_active: OpMeter | None = None
_RESOLVE_AT = 4096  # pending CUDA events after which finished ones are folded in


def enable() -> OpMeter:
    """Start metering (or return the meter already running)."""
    global _active
    if _active is None:
        _active = OpMeter()
    return _active


def disable() -> None:
    global _active
    _active = None


def active() -> OpMeter | None:
    return _active


def _now(device: torch.device):
    """A timestamp on `device`: a recorded CUDA event, or seconds from perf_counter."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    if device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def _seconds(start, end) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@dataclass
class _OpTotals:
    calls: int = 0
    forward_s: float = 0.0
    backward_s: float = 0.0
    work: float = 0.0  # FLOPs or bytes, forward and backward together
    backends: set[str] = field(default_factory=set)
    unit: str = "tflops"  # the op's OpCost unit: "tflops" or "gbps"


class _BackwardSpan:
    """Shared by the two marks around one op call: the backward's start timestamp."""

    __slots__ = ("meter", "op", "device", "work", "start")

    def __init__(self, meter: OpMeter, op: str, device: torch.device, work: float):
        self.meter, self.op, self.device, self.work = meter, op, device, work
        self.start = None


class _MarkBackwardEnd(torch.autograd.Function):
    """Identity on the op's inputs; its backward runs once all their gradients exist."""

    @staticmethod
    def forward(ctx, span, *tensors):
        ctx.span = span
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        span = ctx.span
        if span.start is not None:
            span.meter._record(span.op, "backward", span.start, _now(span.device), span.work)
            span.start = None
        return (None, *grads)


class _MarkBackwardStart(torch.autograd.Function):
    """Identity on the op's output; its backward runs when the output's gradient arrives."""

    @staticmethod
    def forward(ctx, span, out):
        ctx.span = span
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.span.start = _now(ctx.span.device)
        return None, grad


class OpMeter:
    """Accumulates per-op call counts, times and work since the last reset()."""

    def __init__(self):
        self._totals: dict[str, _OpTotals] = {}
        self._pending: list[tuple] = []  # (op, kind, start, end, work) with CUDA events

    def reset(self) -> None:
        self._totals.clear()
        self._pending.clear()

    # ------------------------------------------------------------------ recording

    def time_call(self, op: str, backend: str, cost: OpCost, fn, args: tuple, kwargs: dict):
        """Run fn(*args, **kwargs), timing its forward and (if grads flow) its backward."""
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        needs_grad = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        span = None
        if needs_grad and torch.is_grad_enabled():
            span = _BackwardSpan(self, op, device, cost.backward)
            marked = _MarkBackwardEnd.apply(span, *(args[i] for i in needs_grad))
            args = list(args)
            for i, t in zip(needs_grad, marked, strict=True):
                args[i] = t
        totals = self._totals.setdefault(op, _OpTotals())
        totals.backends.add(backend)
        totals.unit = cost.unit
        start = _now(device)
        out = fn(*args, **kwargs)
        self._record(op, "forward", start, _now(device), cost.forward)
        self._totals[op].calls += 1
        if span is not None and out.requires_grad:
            out = _MarkBackwardStart.apply(span, out)
        return out

    def _record(self, op: str, kind: str, start, end, work: float) -> None:
        if isinstance(start, float):
            self._add(op, kind, end - start, work)
            return
        self._pending.append((op, kind, start, end, work))
        if len(self._pending) >= _RESOLVE_AT:
            self._resolve(only_finished=True)

    def _add(self, op: str, kind: str, seconds: float, work: float) -> None:
        totals = self._totals.setdefault(op, _OpTotals())
        if kind == "forward":
            totals.forward_s += seconds
        else:
            totals.backward_s += seconds
        totals.work += work

    def _resolve(self, only_finished: bool = False) -> None:
        """Fold pending CUDA events into the totals (waiting for them unless only_finished)."""
        waiting = []
        for op, kind, start, end, work in self._pending:
            if only_finished and not end.query():
                waiting.append((op, kind, start, end, work))
            else:
                self._add(op, kind, _seconds(start, end), work)
        self._pending = waiting

    # ------------------------------------------------------------------ reporting

    def _rows(self, step_seconds: float):
        self._resolve()
        rows = []
        for op, t in self._totals.items():
            busy = t.forward_s + t.backward_s
            unit = t.unit
            rate = OpCost(0.0, 0.0, unit).rate(t.work, busy)
            share = busy / step_seconds if step_seconds > 0 else 0.0
            rows.append((op, t, unit, rate, share))
        return sorted(rows, key=lambda r: -r[4])

    def lines(self, step_seconds: float) -> list[str]:
        """One line per op, biggest share first. `step_seconds` is the wall time the records
        cover (for a log interval: the sum of its step times); forward and backward times
        are per call."""
        out = []
        for op, t, unit, rate, share in self._rows(step_seconds):
            calls = max(t.calls, 1)
            rate_text = f"{rate:8.2f} TFLOPS" if unit == "tflops" else f"{rate:8.1f} GB/s  "
            out.append(
                f"{op:<21} {'+'.join(sorted(t.backends)):<6} calls {t.calls:>6}  "
                f"fwd {1e3 * t.forward_s / calls:8.3f} ms  bwd {1e3 * t.backward_s / calls:8.3f} ms  "
                f"{rate_text}  {100 * share:5.1f}% of step"
            )
        return out

    def metrics(self, step_seconds: float) -> dict[str, float]:
        """Flat metrics for a logger: kernels/<op>/{calls, forward_ms, backward_ms,
        tflops or gbps, share}; times are per call, share is a fraction of step_seconds."""
        out = {}
        for op, t, unit, rate, share in self._rows(step_seconds):
            calls = max(t.calls, 1)
            prefix = f"kernels/{op}/"
            out[prefix + "calls"] = float(t.calls)
            out[prefix + "forward_ms"] = 1e3 * t.forward_s / calls
            out[prefix + "backward_ms"] = 1e3 * t.backward_s / calls
            out[prefix + unit] = rate
            out[prefix + "share"] = share
        return out
