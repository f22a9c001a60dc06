"""Where a CPU training step spends its time.

    uv run python benchmarks/profile_step.py baby_cpu --profile
    uv run python benchmarks/profile_step.py baby_cpu --adamw fused --rss

The step is benchmarks/test_train_step.py's (the training loop's model, optimizer and
clipping on one random batch, torch backend).

--profile: one step under torch.profiler, self time grouped by category (the output
layer's GEMMs, the blocks' GEMMs, the flash-attention kernels, the rest by ATen op) and the
top ops with their shapes.

--adamw loop|fused|foreach: the loop's make_optimizer (default), or AdamW with fused=True
or foreach=True on the same parameter groups.

To compare two revisions, run this script in a `git worktree` of each, alternating.
--rss: three steps in this (fresh) process, then its peak RSS (VmHWM) and current RSS.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_step import Step, status_mb  # noqa: E402

from tsfast import ops  # noqa: E402


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=("tiny", "baby_cpu"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--adamw", choices=("loop", "fused", "foreach"), default="loop")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rss", action="store_true")
    args = ap.parse_args(argv)
    ops.use("torch")
    step = Step(args.preset, torch.device("cpu"))
    set_adamw(step, args.adamw)
    print(f"{args.preset}: {step.n_params:,} parameters, {step.tokens} tokens a step, "
          f"{torch.get_num_threads()} threads, AdamW {args.adamw}")
    if args.rss:
        for _ in range(3):
            step.run()
        print(f"peak RSS {status_mb('VmHWM'):.0f} MiB, RSS now {status_mb('VmRSS'):.0f} MiB")
    if args.profile:
        profile(step, args.top)


if __name__ == "__main__":
    main()
