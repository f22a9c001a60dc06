"""Where a CPU training step spends its time, and before/after comparisons in one run.

    uv run python benchmarks/profile_step.py baby_cpu --profile
    uv run python benchmarks/profile_step.py baby_cpu --compare 0ad95e6 --rounds 3
    uv run python benchmarks/profile_step.py baby_cpu --adamw fused --compare HEAD

The step is benchmarks/test_train_step.py's (the training loop's model, optimizer and
clipping on one random batch, torch backend).

--profile: one step under torch.profiler, self time grouped by category (the output
layer's GEMMs, the blocks' GEMMs, the flash-attention kernels, the rest by ATen op) and the
top ops with their shapes.

--compare REV: tsfast/reference.py as it was at git revision REV (loaded from `git show`)
against the working tree's, steps alternating between the two so that a shared machine's
load falls on both alike; a 2048^3 torch.mm rate is taken before and after. Model FLOP/s
counts as tsfast.flops.gpt_flops_per_token does.

--adamw loop|fused|foreach: the loop's make_optimizer (default), or AdamW with fused=True
or foreach=True on the same parameter groups.

--reference REV: run --profile and --rss with tsfast/reference.py as it was at REV.
--rss: three steps in this (fresh) process, then its peak RSS (VmHWM) and current RSS.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_step import Step, mm_rate, status_mb  # noqa: E402

from tsfast import ops  # noqa: E402


def reference_at(rev: str):
    """The tsfast.reference module as it was at git revision `rev`."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:tsfast/reference.py"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    path = Path(f"/tmp/tsfast_reference_{rev.replace('/', '_')}.py")
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"reference_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_adamw(step: Step, kind: str) -> None:
    if kind == "loop":
        return
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in step.optimizer.param_groups]
    for g in groups:
        g.pop("fused", None)
        g.pop("foreach", None)
    step.optimizer = torch.optim.AdamW(groups, **{kind: True})


def categorize(key: str, shapes: str, vocab: int) -> str:
    big = str(vocab) in shapes
    if key in ("aten::mm", "aten::addmm_", "aten::addmm", "aten::bmm"):
        return "output layer GEMMs" if big else "block GEMMs"
    if "flash_attention" in key:
        return "attention kernels"
    if big:
        return f"vocab-sized {key}"
    return key


def profile(step: Step, top: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step.run()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        step.run()
        wall = time.perf_counter() - start
    vocab = step.model.config.padded_vocab_size
    cats: collections.Counter = collections.Counter()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1e3
        shapes = str(e.input_shapes)
        cats[categorize(e.key, shapes, vocab)] += ms
        rows.append((ms, e.count, e.key, shapes[:100]))
    total = sum(cats.values())
    print(f"one step under the profiler: {wall:.2f} s wall, {total / 1e3:.2f} s self CPU time")
    for cat, ms in cats.most_common(top):
        print(f"{ms:9.1f} ms {100 * ms / total:5.1f}%  {cat}")
    print()
    for ms, count, key, shapes in sorted(rows, reverse=True)[:top]:
        print(f"{ms:9.1f} ms {count:5d}x  {key:45s} {shapes}")


def compare(step: Step, rev: str, rounds: int) -> None:
    import tsfast.reference as current

    old = reference_at(rev)
    variants = {rev: old, "working tree": current}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for module in variants.values():  # warm-up each
        ops.reference = module
        step.run()
    mm_before = mm_rate()
    for _ in range(rounds):
        for name, module in variants.items():
            ops.reference = module
            start = time.perf_counter()
            step.run()
            times[name].append(time.perf_counter() - start)
    ops.reference = current
    mm_after = mm_rate()
    mm = (mm_before + mm_after) / 2
    print(f"2048^3 torch.mm: {mm_before / 1e9:.1f} GFLOP/s before, {mm_after / 1e9:.1f} after; "
          f"model {step.flops_per_step / 1e9:.1f} GFLOP a step")
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = step.flops_per_step / med
        print(f"{name:>14}: median {med:.3f} s ({', '.join(f'{t:.2f}' for t in ts)}), "
              f"{rate / 1e9:.1f} GFLOP/s = {rate / mm:.1%} of the mm rate, {step.tokens / med:,.0f} tokens/s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=("tiny", "baby_cpu"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compare", metavar="REV")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adamw", choices=("loop", "fused", "foreach"), default="loop")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--reference", metavar="REV")
    ap.add_argument("--rss", action="store_true")
    args = ap.parse_args(argv)
    ops.use("torch")
    if args.reference:
        ops.reference = reference_at(args.reference)
    step = Step(args.preset, torch.device("cpu"))
    set_adamw(step, args.adamw)
    print(f"{args.preset}: {step.n_params:,} parameters, {step.tokens} tokens a step, "
          f"{torch.get_num_threads()} threads, AdamW {args.adamw}, reference {args.reference or 'working tree'}")
    if args.rss:
        for _ in range(3):
            step.run()
        print(f"peak RSS {status_mb('VmHWM'):.0f} MiB, RSS now {status_mb('VmRSS'):.0f} MiB")
    if args.profile:
        profile(step, args.top)
    if args.compare:
        compare(step, args.compare, args.rounds)


if __name__ == "__main__":
    main()
