"""One whole optimizer step per preset and provider: forward, backward, clip, AdamW.

    uv run pytest benchmarks/test_train_step.py --benchmark-only
    uv run python benchmarks/test_train_step.py baby_cpu [--steps 3] [--compile]

The step is the training loop's (tsfast.train.loop): the same model, `make_optimizer`,
autocast and gradient clipping, on one micro-batch of random token ids (no data loading:
the loop's sampler is measured apart). gpt2 accumulates 40 micro-batches per optimizer step;
here it is one micro-batch and the optimizer, like every other preset.

Providers: "torch" (eager, the ops' torch paths), "torch.compile" (the same model under
torch.compile) and "triton" (CUDA only). Presets: all four at full shape on a GPU; tiny and
baby_cpu on CPU (baby_gpu and gpt2 are GPU presets: a CPU step would take minutes). tiny's
vocabulary is compact and depends on the corpus: 1000 ids here (the synthetic corpus uses
under a thousand).

extra_info of each row (and .benchmarks/train_step.json): tokens_per_s, model TFLOPS
(tsfast.flops.gpt_flops_per_token: 6 x parameters, the tied embedding once, plus attention's
12 x layers x heads x head_dim x context, per token), MFU (on CPU: model FLOP/s over the
rate of a 2048^3 fp32 torch.mm measured in the same test, before and after the timed
steps; on GPU: over the peak table in tsfast.flops), and peak memory: on GPU
torch.cuda.max_memory_allocated during one step; on CPU the peak RSS during one step (VmHWM)
and its growth over the RSS before it. For baby_cpu on torch a fresh process (this file run
as a script) also reports the RSS that matters for the 1 GB target: after `import torch`,
with the model and optimizer built, and the peak over whole steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tsfast import flops, ops
from tsfast.config import preset
from tsfast.model import GPT
from tsfast.train import runtime
from tsfast.train.loop import make_optimizer, optimizer_step

PRESETS = ("tiny", "baby_cpu", "baby_gpu", "gpt2")
CPU_PRESETS = ("tiny", "baby_cpu")
PROVIDERS = ("torch", "torch.compile", "triton")
TINY_VOCAB = 1000
GPT2_VOCAB = 50257
CPU_SECONDS = 12.0  # CPU rounds are sized to about this much timed work (at least 3)
RSS_STEPS = 2


def on_gpu() -> bool:
    return torch.cuda.is_available()


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def mm_rate(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n^3 fp32 torch.mm on the CPU: the median of `reps` after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


class Step:
    """The model, optimizer and one batch of a preset, and `run()`: one optimizer step."""

    def __init__(self, name: str, device: torch.device, *, compile: bool = False):
        cfg = preset(name)
        vocab = TINY_VOCAB if cfg.vocab == "compact" else GPT2_VOCAB
        torch.manual_seed(0)
        self.cfg = cfg
        self.device = device
        self.dtype = runtime.resolve_dtype("auto", device)
        self.model = GPT(cfg.model_config(vocab)).to(device)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.train_model = torch.compile(self.model) if compile else self.model
        B, T = cfg.batch_size, cfg.block_size
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, vocab, (B, T), generator=gen).to(device)
        self.y = torch.randint(0, vocab, (B, T), generator=gen).to(device)
        self.doc_ids = None  # (B, T) document ids, to time a document-masked step
        self.tokens = B * T
        self.n_params = self.model.num_params()
        self.flops_per_step = self.tokens * flops.gpt_flops_per_token(
            self.n_params, cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        )

    def run(self) -> torch.Tensor:
        with runtime.autocast(self.device, self.dtype):
            _, loss = self.train_model(self.x, self.y, doc_ids=self.doc_ids)
        self.scaler.scale(loss).backward()
        optimizer_step(self.model, self.optimizer, self.scaler, self.cfg.grad_clip)
        return loss


def _skip_reason(name: str, provider: str) -> str | None:
    if provider == "triton" and not on_gpu():
        return "triton provider needs CUDA (on CPU Triton only runs in its slow interpreter)"
    if not on_gpu() and name not in CPU_PRESETS:
        return f"{name} is a GPU preset: at full shape a CPU step takes minutes (CPU runs {', '.join(CPU_PRESETS)})"
    return None


def _cpu_step_peak(run) -> tuple[float, float]:
    """(peak RSS during run(), its growth over the RSS before it), MiB. bench_utils'
    malloc_trim + clear_refs method: see benchmarks/conftest.py."""
    from bench_utils import peak_memory_mb

    grown = peak_memory_mb(run)
    return status_mb("VmHWM"), grown


def fresh_process_rss(name: str, *, steps: int = RSS_STEPS, compile: bool = False) -> dict:
    """Run this file as a script in a new process (nothing else in it) and read its report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), name, "--steps", str(steps)]
    if compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TSFAST_KERNELS="torch"))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", PRESETS)
def test_train_step(benchmark, record_bench, name, provider):
    reason = _skip_reason(name, provider)
    if reason:
        pytest.skip(reason)
    device = torch.device("cuda" if on_gpu() else "cpu")
    backend = "triton" if provider == "triton" else "torch"
    benchmark.group = f"train_step {name}"
    info: dict = {}
    with ops.use(backend):
        torch._dynamo.reset()
        step = Step(name, device, compile=provider == "torch.compile")
        start = time.perf_counter()
        step.run()  # warm-up: compiles, autotunes, touches the optimizer state
        if on_gpu():
            torch.cuda.synchronize()
        info["first_step_s"] = time.perf_counter() - start
        if on_gpu():
            seconds = _gpu_time(benchmark, step.run)
            torch.cuda.reset_peak_memory_stats()
            step.run()
            torch.cuda.synchronize()
            info["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            rate = step.flops_per_step / seconds
            info["mfu"] = flops.mfu(rate, torch.cuda.get_device_name())
        else:
            mm_before = mm_rate()
            rounds = max(3, min(10, int(CPU_SECONDS / max(info["first_step_s"], 1e-3))))
            benchmark.pedantic(step.run, rounds=rounds, iterations=1, warmup_rounds=0)
            seconds = benchmark.stats.stats.median
            mm_after = mm_rate()
            info["peak_rss_mb"], info["peak_mb"] = _cpu_step_peak(step.run)
            rate = step.flops_per_step / seconds
            mm = (mm_before + mm_after) / 2
            info.update(mm_gflops=mm / 1e9, mm_gflops_before=mm_before / 1e9,
                        mm_gflops_after=mm_after / 1e9, mfu=rate / mm, load_avg_1min=os.getloadavg()[0])
    if not on_gpu() and name == "baby_cpu" and provider == "torch":
        info["fresh_process"] = fresh_process_rss(name)
    record_bench(
        suite="train_step", op="train_step", provider=provider, mode="fwd+bwd+clip+adamw",
        shape=name, dims=dict(batch=step.cfg.batch_size, context=step.cfg.block_size,
                              n_layer=step.cfg.n_layer, n_embd=step.cfg.n_embd,
                              vocab=step.model.config.padded_vocab_size, params=step.n_params),
        dtype=str(step.dtype).removeprefix("torch."), median_ms=1e3 * seconds,
        rate=rate / 1e12, rate_unit="TFLOPS", tokens_per_s=step.tokens / seconds,
        model_gflop_per_step=step.flops_per_step / 1e9, threads=torch.get_num_threads(), **info,
    )


def _gpu_time(benchmark, run) -> float:
    import triton.testing

    result = {}

    def measure():
        result["ms"] = triton.testing.do_bench(run, warmup=3, rep=200, return_mode="median")

    benchmark.pedantic(measure, rounds=1, iterations=1)
    return result["ms"] / 1e3


def main(argv=None) -> None:
    """Fresh-process figures for one preset on CPU: RSS after import, once built, peak."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=CPU_PRESETS)
    ap.add_argument("--steps", type=int, default=RSS_STEPS)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    report = {"imports_rss_mb": status_mb("VmRSS")}  # torch, tsfast, pytest
    ops.use("torch")
    step = Step(args.preset, torch.device("cpu"), compile=args.compile)
    report["built_rss_mb"] = status_mb("VmRSS")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    report.update(
        peak_rss_mb=status_mb("VmHWM"), step_s=times, last_step_gflops=step.flops_per_step / times[-1] / 1e9,
        params=step.n_params, params_mb=4 * step.n_params / 2**20,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
