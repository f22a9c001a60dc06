"""Per-op benchmarks: every op x provider x mode x preset shape.

    uv run pytest benchmarks --benchmark-only             (add -k "rope and triton" to narrow)

Providers: "torch" (eager, the ops' torch paths through ops.use("torch")), "torch.compile"
(the same under torch.compile) and "triton" (ops.use("triton"); CUDA only: on CPU Triton
runs only in its interpreter, which is a debugger, not a benchmark). Modes: "forward" (with
grad enabled, as in training), "backward" (one forward, then the backward alone, repeated
with retain_graph) and "forward+backward".

Shapes: the gpt2 and baby_gpu presets on CUDA (bf16); on CPU the same widths with fewer
rows and a smaller vocabulary (fp32: bf16 matmuls crawl on CPU), and torch.compile at the
baby_gpu shape only, so that the CPU run stays within its few-minute budget.

Each benchmark records its median time, TFLOPS or GB/s (tsfast.flops) and peak memory;
see benchmarks/conftest.py for the table printed at the end and .benchmarks/ops.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from bench_utils import device, on_gpu, peak_memory_mb

from tsfast import flops, ops
from tsfast.ops import attention, layernorm, losses

# Preset shapes: B, T, H, D for attention; C and the two layernorm_linear widths (qkv: 3C,
# MLP: 4C) from n_embd; V padded to a multiple of 64 (GPT-2's 50257 -> 50304).
GPU_SHAPES = {
    "gpt2": dict(B=12, T=1024, H=12, D=64, C=768, V=50304),
    "baby_gpu": dict(B=64, T=512, H=6, D=64, C=384, V=50304),
}
CPU_SHAPES = {
    "gpt2": dict(B=1, T=256, H=12, D=64, C=768, V=8192),
    "baby_gpu": dict(B=2, T=128, H=6, D=64, C=384, V=8192),
}
CPU_COMPILE_SHAPES = ("baby_gpu",)

OPS = ("rope_attention", "layernorm_linear", "layernorm_linear_gelu", "layer_norm", "cross_entropy",
       "linear_cross_entropy")
PROVIDERS = ("torch", "torch.compile", "triton")
MODES = ("forward", "backward", "forward+backward")
CPU_SECONDS_PER_BENCH = 0.4  # CPU rounds are sized to about this much timed work


@dataclass
class Case:
    fn: object  # fn(*inputs) -> tensor
    inputs: list[torch.Tensor]  # the differentiable inputs, in fn's order
    cost: flops.OpCost
    dims: dict


def make_case(op: str, shape: str, dev: torch.device, dtype: torch.dtype) -> Case:
    s = (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)[shape]
    B, T, H, D, C, V = s["B"], s["T"], s["H"], s["D"], s["C"], s["V"]
    N = B * T
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*size, scale=1.0):
        t = torch.randn(*size, generator=g, device=dev, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_()

    elem = torch.tensor([], dtype=dtype).element_size()
    if op == "rope_attention":
        cos, sin = ops.rope_cos_sin(T, D, device=dev)
        # q, k, v as views of one fused projection, the way the model produces them
        qkv = rand(B, T, 3, H, D)
        return Case(lambda qkv: ops.rope_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), cos, sin, causal=True),
                    [qkv], attention.rope_attention_cost(B, H, T, D, causal=True), dict(B=B, H=H, T=T, D=D))
    if op.startswith("layernorm_linear"):
        gelu = op.endswith("gelu")
        F = 4 * C if gelu else 3 * C
        activation = "gelu_tanh" if gelu else None
        inputs = [rand(N, C), rand(C), rand(C), rand(F, C, scale=C**-0.5), rand(F, scale=0.1)]
        return Case(lambda x, lw, lb, w, b: ops.layernorm_linear(x, lw, lb, w, b, activation=activation),
                    inputs, layernorm.layernorm_linear_cost(N, C, F), dict(N=N, C=C, F=F))
    if op == "layer_norm":
        return Case(lambda x, w, b: ops.layer_norm(x, w, b), [rand(N, C), rand(C), rand(C)],
                    layernorm.layer_norm_cost(N, C, elem), dict(N=N, C=C))
    targets = torch.randint(0, V, (N,), generator=g, device=dev)
    if op == "cross_entropy":
        return Case(lambda logits: ops.cross_entropy(logits, targets), [rand(N, V, scale=2.0)],
                    losses.cross_entropy_cost(N, V, elem), dict(N=N, V=V))
    if op == "linear_cross_entropy":
        return Case(lambda h, w: ops.linear_cross_entropy(h, w, targets), [rand(N, C), rand(V, C, scale=C**-0.5)],
                    losses.linear_cross_entropy_cost(N, C, V, with_grad=True), dict(N=N, C=C, V=V))
    raise ValueError(f"unknown op {op!r}")


# The case (inputs) and its compiled function for the (op, shape) being benchmarked, shared
# by its providers and modes; one at a time, so that GPU memory holds one op's inputs.
_current: dict = {}


def case_for(op: str, shape: str, provider: str) -> tuple[Case, object]:
    dev = device()
    if _current.get("key") != (op, shape):
        _current.clear()
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        _current.update(key=(op, shape), case=make_case(op, shape, dev, dtype))
    case = _current["case"]
    if provider != "torch.compile":
        return case, case.fn
    if "compiled" not in _current:
        _current["compiled"] = torch.compile(case.fn, fullgraph=True, dynamic=False)
    return case, _current["compiled"]


def mode_fn(case: Case, mode: str, fn):
    """The callable a benchmark times, and the work (FLOPs or bytes) one call does."""
    if mode == "forward":
        return lambda: fn(*case.inputs), case.cost.forward
    if mode == "forward+backward":
        def step():
            out = fn(*case.inputs)
            return torch.autograd.grad(out, case.inputs, torch.ones_like(out))
        return step, case.cost.forward + case.cost.backward
    out = fn(*case.inputs)
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, case.inputs, grad, retain_graph=True), case.cost.backward


def _skip_reason(op: str, provider: str, shape: str, mode: str) -> str | None:
    if op == "linear_cross_entropy" and mode == "backward":
        return ("linear_cross_entropy computes its gradients in the forward (its backward only "
                "rescales them, once): see its forward and forward+backward rows")
    if provider == "triton":
        if not on_gpu():
            return "triton provider needs CUDA (on CPU Triton only runs in its slow interpreter)"
    if provider == "torch.compile" and not on_gpu() and shape not in CPU_COMPILE_SHAPES:
        return f"torch.compile on CPU runs at {', '.join(CPU_COMPILE_SHAPES)} only (compiling takes ~20 s a graph here)"
    return None


def _time(benchmark, run) -> float:
    """Median seconds of run(): do_bench on CUDA, pytest-benchmark's rounds on CPU."""
    if on_gpu():
        import triton.testing

        result = {}

        def measure():
            result["ms"] = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")

        benchmark.pedantic(measure, rounds=1, iterations=1)
        return result["ms"] / 1e3
    import time

    start = time.perf_counter()
    run()  # one untimed call sizes the rounds
    first = time.perf_counter() - start
    rounds = max(3, min(20, int(CPU_SECONDS_PER_BENCH / max(first, 1e-6))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


# Ids read op-shape-provider-mode with mode varying fastest, so each (op, shape) builds its
# inputs and compiles once.
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, record_bench, op, shape, provider, mode):
    reason = _skip_reason(op, provider, shape, mode)
    if reason:
        pytest.skip(reason)
    case, fn = case_for(op, shape, provider)
    benchmark.group = f"{op} {shape} {mode}"
    with ops.use("triton" if provider == "triton" else "torch"):
        run, work = mode_fn(case, mode, fn)
        run()  # warm-up: compiles, autotunes
        peak = peak_memory_mb(run)
        seconds = _time(benchmark, run)
    rate = case.cost.rate(work, seconds) if work else None
    record_bench(op=op, provider=provider, mode=mode, shape=shape, dims=case.dims,
                 dtype=str(case.inputs[0].dtype).removeprefix("torch."), median_ms=1e3 * seconds, rate=rate,
                 rate_unit="TFLOPS" if case.cost.unit == "tflops" else "GB/s", peak_mb=peak)
