"""The per-op meter: what it times, the work it credits, and that it changes no result."""

import time

import pytest
import torch

from tsfast import meter, ops
from tsfast.ops import attention, layernorm, losses
from tsfast.ops.selection import Candidate, Family

B, H, T, D = 2, 2, 16, 16
N, C, F, V = 12, 16, 24, 40


@pytest.fixture(autouse=True)
def _torch_backend_and_no_meter(monkeypatch):
    monkeypatch.setattr(ops._backend, "_selected", "torch")
    meter.disable()
    yield
    meter.disable()


def _all_ops(seed: int, grad: bool = True):
    """Each op once (layernorm_linear twice); returns the outputs and the leaf inputs."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    q, k, v, x, lw, lb, w, b, logits, h, wv = (
        r(B, H, T, D), r(B, H, T, D), r(B, H, T, D), r(N, C), r(C), r(C), r(F, C), r(F),
        r(N, V), r(N, C), r(V, C))
    targets = torch.randint(0, V, (N,), generator=g)
    cos, sin = ops.rope_cos_sin(T, D)
    outs = [
        ops.rope_attention(q, k, v, cos, sin),
        ops.layernorm_linear(x, lw, lb, w, b),
        ops.layernorm_linear(x, lw, lb, w, None, activation="gelu_tanh"),
        ops.layer_norm(x, lw, lb),
        ops.cross_entropy(logits, targets),
        ops.linear_cross_entropy(h, wv, targets),
    ]
    return outs, [q, k, v, x, lw, lb, w, b, logits, h, wv]


def _run_with_backward(seed, grad=True):
    outs, leaves = _all_ops(seed, grad)
    if grad:
        sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)).backward()
    return outs, leaves


def test_enable_disable_active():
    assert meter.active() is None
    m = meter.enable()
    assert meter.active() is m and meter.enable() is m
    meter.disable()
    assert meter.active() is None


def test_metering_changes_no_output_or_gradient():
    outs_off, leaves_off = _run_with_backward(seed=1)
    assert not any("Mark" in type(o.grad_fn).__name__ for o in outs_off)  # off: nothing wrapped
    meter.enable()
    outs_on, leaves_on = _run_with_backward(seed=1)
    assert all("MarkBackwardStart" in type(o.grad_fn).__name__ for o in outs_on)
    for a, b in zip(outs_off + [t.grad for t in leaves_off], outs_on + [t.grad for t in leaves_on], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


UNIT = dict(rope_attention="tflops", layernorm_linear="tflops", linear_cross_entropy="tflops",
            layer_norm="gbps", cross_entropy="gbps")


def test_every_op_gets_a_line_with_calls_times_rate_and_share():
    m = meter.enable()
    start = time.perf_counter()
    for seed in range(2):
        _run_with_backward(seed)
    wall = time.perf_counter() - start
    lines = m.lines(wall)
    metrics = m.metrics(wall)
    assert len(lines) == 5
    expected_calls = dict(rope_attention=2, layernorm_linear=4, layer_norm=2, cross_entropy=2,
                          linear_cross_entropy=2)
    for op, calls in expected_calls.items():
        line = next(s for s in lines if s.startswith(op + " "))
        assert f"calls {calls:>6}" in line and "torch" in line and "% of step" in line
        assert ("TFLOPS" if UNIT[op] == "tflops" else "GB/s") in line
        prefix = f"kernels/{op}/"
        assert metrics[prefix + "calls"] == calls
        assert metrics[prefix + "forward_ms"] > 0 and metrics[prefix + "backward_ms"] > 0
        assert metrics[prefix + UNIT[op]] > 0
        assert 0 < metrics[prefix + "share"] < 1
    assert sum(v for k, v in metrics.items() if k.endswith("/share")) <= 1.0
    shares = [float(s.split("%")[0].split()[-1]) for s in lines]
    assert shares == sorted(shares, reverse=True)


def test_rate_credits_the_formulas_work():
    m = meter.enable()
    _run_with_backward(seed=3)
    metrics = m.metrics(1.0)

    def work_done(op):
        p = f"kernels/{op}/"
        busy_s = (metrics[p + "forward_ms"] + metrics[p + "backward_ms"]) * metrics[p + "calls"] / 1e3
        unit = UNIT[op]
        return metrics[p + unit] * busy_s * (1e12 if unit == "tflops" else 1e9)

    attn = attention.rope_attention_cost(B, H, T, D)
    assert work_done("rope_attention") == pytest.approx(attn.forward + attn.backward)
    lnl = layernorm.layernorm_linear_cost(N, C, F)
    assert work_done("layernorm_linear") == pytest.approx(2 * (lnl.forward + lnl.backward))
    ce = losses.cross_entropy_cost(N, V, 4)
    assert work_done("cross_entropy") == pytest.approx(ce.forward + ce.backward)
    lce = losses.linear_cross_entropy_cost(N, C, V, with_grad=True)
    assert work_done("linear_cross_entropy") == pytest.approx(lce.forward)


def test_no_grad_records_forward_only():
    m = meter.enable()
    with torch.no_grad():
        _all_ops(seed=4)
    metrics = m.metrics(1.0)
    assert metrics["kernels/rope_attention/calls"] == 1
    assert metrics["kernels/rope_attention/forward_ms"] > 0
    assert all(v == 0 for k, v in metrics.items() if k.endswith("backward_ms"))
    lce = losses.linear_cross_entropy_cost(N, C, V, with_grad=False)
    p = "kernels/linear_cross_entropy/"
    assert metrics[p + "tflops"] * metrics[p + "forward_ms"] / 1e3 * 1e12 == pytest.approx(lce.forward)


class _SlowLayerNorm(torch.autograd.Function):
    """Sleeps 20 ms forward and 40 ms backward, so the meter's spans can be checked."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        time.sleep(0.02)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.04)
        return grad * 2, None, None, None


class _SlowBackwardElsewhere(torch.autograd.Function):
    """A 100 ms backward outside the op, run just before the op's backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.1)
        return grad


def test_forward_and_backward_spans_cover_the_op_and_nothing_else(monkeypatch):
    family = layernorm.LAYER_NORM  # the op takes its torch path from its family of candidates
    slow = Candidate("torch", "torch", lambda x, w, b, eps: _SlowLayerNorm.apply(x, w, b, eps))
    monkeypatch.setattr(layernorm, "LAYER_NORM", Family(
        family.op, (family.candidates[0], slow), fields=family.fields, bucketed=family.bucketed,
        bench_inputs=family.bench_inputs))
    m = meter.enable()
    x = torch.randn(N, C, requires_grad=True)
    y = _SlowBackwardElsewhere.apply(ops.layer_norm(x, torch.ones(C), None))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    metrics = m.metrics(1.0)
    assert 20 <= metrics["kernels/layer_norm/forward_ms"] < 40
    assert 40 <= metrics["kernels/layer_norm/backward_ms"] < 100


def test_reset_and_disable_stop_the_records():
    m = meter.enable()
    _run_with_backward(seed=5)
    m.reset()
    assert m.lines(1.0) == [] and m.metrics(1.0) == {}
    meter.disable()
    _run_with_backward(seed=6)
    assert m.lines(1.0) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_cuda_events_resolve_without_per_call_sync():
    m = meter.enable()
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)
    for _ in range(5):
        ops.layer_norm(x, w, None).sum().backward()
    assert m._pending  # events wait until asked for
    metrics = m.metrics(1.0)
    assert not m._pending
    assert metrics["kernels/layer_norm/calls"] == 5
    assert metrics["kernels/layer_norm/forward_ms"] > 0 and metrics["kernels/layer_norm/backward_ms"] > 0
