"""Peak memory of the LM loss, forward+backward, at the gpt2 shape (N=12,288, C=768, V=50,304):
the fused/chunked `linear_cross_entropy` against the full-logits formulation, measured in the
same run, each in a fresh process (`tsfast.testing.loss_peak_memory`). The chunked path must
stay at or under 1/4 of the full formulation's peak.

CPU: fp32, the torch chunked path against the full logits (~10 GB for the latter; scaled to
N=2048, C=128 when less than 16 GB is free, which keeps the ratio: see
tests/test_linear_cross_entropy_memory.py). GPU: bf16, the Triton kernel against the full logits.
"""

import psutil
from bench_utils import on_gpu

from tsfast.ops import losses
from tsfast.testing import loss_peak_memory

GPT2 = dict(n=12288, c=768, v=50304)
SCALED = dict(n=2048, c=128, v=50304)


def test_linear_cross_entropy_peak_memory(benchmark, record_bench):
    device = "cuda" if on_gpu() else "cpu"
    fused_mode = "triton" if on_gpu() else "chunked"
    big_enough = on_gpu() or psutil.virtual_memory().available > 16 * 2**30
    shape, dims = ("gpt2", GPT2) if big_enough else ("gpt2/6", SCALED)
    results = {}

    def measure_fused():
        results[fused_mode] = loss_peak_memory(fused_mode, device=device, **dims)

    benchmark.pedantic(measure_fused, rounds=1, iterations=1)
    results["full"] = loss_peak_memory("full", device=device, **dims)
    cost = losses.linear_cross_entropy_cost(dims["n"], dims["c"], dims["v"], with_grad=True)
    for mode, r in results.items():
        record_bench(suite="loss_memory", op="linear_cross_entropy", provider=mode,
                     mode="forward+backward", shape=shape, dims=dims, dtype="fp32" if device == "cpu" else "bf16",
                     median_ms=1e3 * r["seconds"], rate=cost.forward / r["seconds"] / 1e12,
                     rate_unit="TFLOPS", peak_mb=r["peak_mib"] * 2**20 / 1e6)
    ratio = results[fused_mode]["peak_mib"] / results["full"]["peak_mib"]
    benchmark.extra_info["peak_ratio_vs_full_logits"] = ratio
    print(f"\nlinear_cross_entropy {shape}: {fused_mode} {results[fused_mode]['peak_mib']:.0f} MiB, "
          f"full logits {results['full']['peak_mib']:.0f} MiB, ratio {ratio:.3f}")
    assert abs(results[fused_mode]["loss"] - results["full"]["loss"]) <= 1e-2 * abs(results["full"]["loss"])
    assert ratio <= 0.25, f"{fused_mode} peak is {ratio:.2f} of the full-logits peak (limit 1/4)"
