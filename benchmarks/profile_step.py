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

--doc-mask: the batch is cut from a stream of stories (lengths uniform in [L/2, 3L/2],
L = --doc-len, default 200: TinyStories' mean in GPT-2 tokens), so rows start mid-story,
and the step runs with doc_ids (document-masked attention, what `--doc_mask true` trains).
With --profile it profiles that step; alone it alternates --rounds steps without and with
doc_ids in one process (the same model and batch) under the per-op meter, and prints the
medians of step time and of rope_attention's forward and backward time per step.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_step import Step, status_mb  # noqa: E402

from tsfast import meter, ops  # noqa: E402
from tsfast.data.loader import doc_ids_from_eot  # noqa: E402


def set_adamw(step: Step, kind: str) -> None:
    if kind == "loop":
        return
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in step.optimizer.param_groups]
    for g in groups:
        g.pop("fused", None)
        g.pop("foreach", None)
    step.optimizer = torch.optim.AdamW(groups, **{kind: True})


def story_doc_ids(batch: int, block: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """(B, T) doc_ids of B windows cut at random from a stream of stories whose lengths are
    uniform in [mean_len/2, 3 mean_len/2], as the training loader derives them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, mean_len // 2), 3 * mean_len // 2 + 1, size=4 * batch * block // mean_len + 4)
    stream = np.zeros(int(lengths.sum()), dtype=np.int64)
    stream[np.cumsum(lengths) - 1] = 1  # 1 marks each story's last token (its EOT)
    starts = rng.integers(0, len(stream) - block, size=batch)
    return torch.from_numpy(doc_ids_from_eot(stream[starts[:, None] + np.arange(block)], 1))


def compare_doc_mask(step: Step, doc_ids: torch.Tensor, rounds: int) -> None:
    """Alternate steps without and with doc_ids; medians of step and attention times."""
    from tsfast.ops.attention import attended_pairs

    runs: dict[str, list[tuple[float, float, float]]] = {"without": [], "with": []}
    active = meter.enable()
    try:
        step.doc_ids = None
        step.run()  # warm-up
        for _ in range(rounds):
            for mode in ("without", "with"):
                step.doc_ids = doc_ids if mode == "with" else None
                active.reset()
                start = time.perf_counter()
                step.run()
                wall = time.perf_counter() - start
                t = active._totals["rope_attention"]
                runs[mode].append((wall, t.forward_s, t.backward_s))
    finally:
        meter.disable()
        step.doc_ids = None
    B, T = doc_ids.shape
    share = attended_pairs(doc_ids, T, causal=True) / (B * T * (T + 1) / 2)
    print(f"doc_ids: {int(doc_ids[:, -1].sum() + B)} documents in {B} rows of {T}; "
          f"{100 * share:.1f}% of the causal (query, key) pairs attended")
    print(f"{'':8s} {'step s':>8s} {'attn fwd ms':>12s} {'attn bwd ms':>12s} {'attn ms':>9s}")
    med = {}
    for mode, rows in runs.items():
        wall, fwd, bwd = (float(np.median([r[i] for r in rows])) for i in range(3))
        med[mode] = (wall, fwd + bwd)
        print(f"{mode:8s} {wall:8.3f} {1e3 * fwd:12.1f} {1e3 * bwd:12.1f} {1e3 * (fwd + bwd):9.1f}")
    pairs = [(w[1] + w[2]) / (n[1] + n[2]) for n, w in zip(runs["without"], runs["with"], strict=True)]
    steps = [w[0] / n[0] for n, w in zip(runs["without"], runs["with"], strict=True)]
    print(f"with / without, per pair: attention {np.median(pairs):.2f}x "
          f"(range {min(pairs):.2f}-{max(pairs):.2f}), step {np.median(steps):.2f}x "
          f"(range {min(steps):.2f}-{max(steps):.2f}), {rounds} pairs")


def categorize(key: str, shapes: str, vocab: int) -> str:
    big = str(vocab) in shapes
    if key in ("aten::mm", "aten::addmm_", "aten::addmm", "aten::bmm"):
        return "output layer GEMMs" if big else "block GEMMs"
    if "flash_attention" in key or "scaled_dot_product" in key or "_efficient_attention" in key:
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
    ap.add_argument("--doc-mask", action="store_true", help="document-masked attention (see above)")
    ap.add_argument("--doc-len", type=int, default=200, help="mean story length in tokens for --doc-mask")
    ap.add_argument("--rounds", type=int, default=5, help="pairs of steps for --doc-mask without --profile")
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
    doc_ids = story_doc_ids(step.cfg.batch_size, step.cfg.block_size, args.doc_len) if args.doc_mask else None
    if args.profile:
        step.doc_ids = doc_ids
        profile(step, args.top)
    elif doc_ids is not None:
        compare_doc_mask(step, doc_ids, args.rounds)


if __name__ == "__main__":
    main()
