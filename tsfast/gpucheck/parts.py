"""The parts of the GPU check, each run in its own process by tsfast.gpucheck:

    python -m tsfast.gpucheck.parts PART ROWS_JSONL [WORK_DIR]

Each part appends one JSON object a line to ROWS_JSONL as soon as a figure exists, so a part
cut off by its time budget still leaves what it measured. Needs a CUDA GPU and a checkout
of the repository (the parts reuse benchmarks/ and tests/).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tsfast.plot import PlotError, read_metrics

REPO = Path(__file__).resolve().parents[2]
PRESETS = ("baby_gpu", "gpt2")
DEVICE = "cuda"


class Rows:
    """Appends rows to a JSONL file, flushed one by one."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def add(self, **row) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def _benchmarks():
    """benchmarks/test_ops.py and test_train_step.py, importable (their cases are reused)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import test_ops
    import test_train_step

    return test_ops, test_train_step


def _do_bench(fn, rep: int = 50) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


# ----------------------------------------------------------------------------- environment


def environment(rows: Rows, work: Path) -> None:
    import torch

    from tsfast import flops
    from tsfast.train.runtime import nvidia_driver_version

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"does not import ({type(e).__name__}: {e})"
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    rows.add(kind="environment", gpu=name, gpus=torch.cuda.device_count(),
             capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
             sms=props.multi_processor_count, driver=nvidia_driver_version(), cuda_runtime=torch.version.cuda,
             cudnn=torch.backends.cudnn.version(), torch=torch.__version__, triton=triton_version,
             python=platform.python_version(), mfu_peak_tflops=flops.peak_tflops(name),
             bf16=torch.cuda.is_bf16_supported())


# ----------------------------------------------------------------------------- tests

TEST_RUNS = (
    ("pytest -m gpu", ["-m", "gpu", "tests"]),
    ("parity, candidates, compile and kernels in the model, natively",
     ["tests/parity", "tests/test_compile.py", "tests/test_kernels_in_model.py", "-n", "4"]),
)


def gpu_tests(rows: Rows, work: Path) -> None:
    """The GPU-marked tests, then the parity suite (bf16 of every op and candidate), the
    compile tests and the kernels-in-the-model tests, which run natively on a GPU."""
    import xml.etree.ElementTree as ET

    for i, (label, args) in enumerate(TEST_RUNS):
        xml = work / f"junit-{i}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed = []
        if xml.is_file():
            root = ET.parse(xml).getroot()
            for suite in root.iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
            for case in root.iter("testcase"):
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:200]}")
        rows.add(kind="tests", label=label, command=" ".join(cmd[1:]), exit_code=proc.returncode,
                 seconds=time.perf_counter() - start, passed=counts["tests"] - counts["failures"] - counts["errors"]
                 - counts["skipped"], failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                 failures=failed[:30], output_tail=proc.stdout[-1500:] if proc.returncode not in (0, 5) else "")


# ----------------------------------------------------------------------------- the measured selection


def selection(rows: Rows, work: Path) -> None:
    """The choices --kernels auto makes for a training run of each GPU preset, without and
    with --doc_mask, measured now (a fresh selector: the on-disk cache is neither read nor
    written)."""
    import torch

    from tsfast import ops
    from tsfast.config import preset
    from tsfast.model import GPT
    from tsfast.ops import selection as sel
    from tsfast.train import kernel_choice, runtime

    device = torch.device(DEVICE)
    dtype = runtime.resolve_dtype("auto", device)
    for name in PRESETS:
        cfg = preset(name)
        selector = sel.Selector(cache_dir=None)
        sel.set_current(selector)
        model = GPT(cfg.model_config(50257)).to(device)
        with ops.use("auto"):  # then with document masking: only its attention keys are new
            for doc_mask in (False, True):
                kernel_choice.warm_up(model, cfg.batch_size, cfg.block_size, device, dtype, doc_mask)
        for record in selector.records():
            rows.add(kind="selection", preset=name, **record)
        del model
        _free()


# ----------------------------------------------------------------------------- per op


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def per_op(rows: Rows, work: Path) -> None:
    """benchmarks/test_ops.py's cases at the baby_gpu and gpt2 shapes, bf16: Triton and torch
    eager first (both shapes), torch.compile last (compiling is the slow part)."""
    import torch

    from tsfast import ops

    test_ops, _ = _benchmarks()
    from bench_utils import peak_memory_mb

    device = torch.device(DEVICE)
    plan = [(shape, op, provider) for provider in ("triton", "torch") for shape in PRESETS for op in test_ops.OPS]
    plan += [(shape, op, "torch.compile") for shape in PRESETS for op in test_ops.OPS]
    for shape, op, provider in plan:
        torch._dynamo.reset()
        case = test_ops.make_case(op, shape, device, torch.bfloat16)
        fn = torch.compile(case.fn, fullgraph=True, dynamic=False) if provider == "torch.compile" else case.fn
        for mode in test_ops.MODES:
            if test_ops._skip_reason(op, provider, shape, mode):
                continue
            row = dict(kind="op", op=op, shape=shape, provider=provider, mode=mode, dims=case.dims)
            try:
                with ops.use("triton" if provider == "triton" else "torch"):
                    run, work_amount = test_ops.mode_fn(case, mode, fn)
                    run()  # compiles, autotunes
                    peak = peak_memory_mb(run)
                    ms = _do_bench(run)
                rate = case.cost.rate(work_amount, ms / 1e3) if work_amount else None
                rows.add(**row, ms=ms, rate=rate, unit="TFLOPS" if case.cost.unit == "tflops" else "GB/s",
                         peak_mb=peak)
            except Exception as e:  # one failing case must not cost the others
                rows.add(**row, error=f"{type(e).__name__}: {e}"[:500])
        del case, fn
        _free()


# ----------------------------------------------------------------------------- one training step


def train_step(rows: Rows, work: Path) -> None:
    """benchmarks/test_train_step.py's Step (forward, backward, clip, AdamW on one micro-batch)
    for baby_gpu and gpt2 on each provider; torch.compile last."""
    import torch

    from tsfast import flops, ops

    _, test_train_step = _benchmarks()
    device = torch.device(DEVICE)
    for provider in ("triton", "torch", "torch.compile"):
        for name in PRESETS:
            row = dict(kind="train_step", preset=name, provider=provider)
            try:
                with ops.use("triton" if provider == "triton" else "torch"):
                    torch._dynamo.reset()
                    step = test_train_step.Step(name, device, compile=provider == "torch.compile")
                    start = time.perf_counter()
                    step.run()
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    ms = _do_bench(step.run, rep=300)
                    torch.cuda.reset_peak_memory_stats()
                    step.run()
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated() / 2**20
                seconds = ms / 1e3
                rows.add(**row, ms=ms, tokens_per_s=step.tokens / seconds, tflops=step.flops_per_step / seconds / 1e12,
                         mfu=flops.mfu(step.flops_per_step / seconds, torch.cuda.get_device_name()),
                         peak_mb=peak, first_step_s=first, tokens=step.tokens, params=step.n_params)
                del step
            except Exception as e:
                rows.add(**row, error=f"{type(e).__name__}: {e}"[:500])
            _free()


# ----------------------------------------------------------------------------- 300 iterations

CONVERGENCE_ITERS = 300


def convergence(rows: Rows, work: Path) -> None:
    """baby_gpu on the synthetic corpus, --kernels triton and --kernels torch side by side on
    the GPU (same seed, no torch.compile: the loss is compared, not the speed)."""
    from tsfast.data.prepare import ensure_synthetic

    data = ensure_synthetic(REPO / "data", progress=False)
    procs = {}
    for kernels in ("triton", "torch"):
        out = work / f"convergence-{kernels}"
        args = ["--config", "baby_gpu", "--kernels", kernels, "--max_iters", str(CONVERGENCE_ITERS),
                "--eval_interval", str(CONVERGENCE_ITERS), "--eval_iters", "5", "--log_interval", "10",
                "--no-compile", "--sample_at_end", "false", "--data", str(data), "--out_dir", str(out)]
        log = open(work / f"convergence-{kernels}.log", "w")
        procs[kernels] = (subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                                           stdout=log, stderr=subprocess.STDOUT), out, log)
    for kernels, (proc, out, log) in procs.items():
        code = proc.wait()
        log.close()
        try:  # the loss curve so far, also of a run that crashed mid-write
            losses = [(r["step"], r["loss"]) for r in read_metrics(out)[0]]
        except PlotError:
            losses = []
        tail = (work / f"convergence-{kernels}.log").read_text(errors="replace")[-1500:] if code else ""
        rows.add(kind="convergence", kernels=kernels, exit_code=code, losses=losses, log_tail=tail)


PARTS = {"environment": environment, "gpu_tests": gpu_tests, "selection": selection, "per_op": per_op, "train_step": train_step,
         "convergence": convergence}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, rows_path = argv[0], Path(argv[1])
    work = Path(argv[2]) if len(argv) > 2 else rows_path.parent
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    PARTS[name](Rows(rows_path), work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
