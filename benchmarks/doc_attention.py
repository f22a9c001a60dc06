"""One layer's rope_attention, forward + backward, on CPU: without doc_ids, with doc_ids on
today's torch path, and with doc_ids on the prototype in tsfast/ops/_doc_attention.py.

    uv run python benchmarks/doc_attention.py baby_cpu --rounds 9 --threads 1

The shape is the preset's (batch x heads x context x head dim), the q, k, v views of a fused
projection as in the model; doc_ids as `profile_step.py --doc-mask` cuts them (stories of
--doc-len tokens on average, rows starting mid-story). The three variants run one after
another in each round; the script prints each one's median and the median (and range) of
the per-round ratios to the plain call, which hold up on a busy machine better than times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import story_doc_ids  # noqa: E402

from tsfast import ops  # noqa: E402
from tsfast.config import preset  # noqa: E402
from tsfast.ops import _doc_attention  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=("tiny", "baby_cpu"))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--doc-len", type=int, default=200)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    B, H, T, D = cfg.batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, requires_grad=True)
    grad = torch.randn(B, H, T, D)
    cos, sin = ops.rope_cos_sin(T, D)
    docs = story_doc_ids(B, T, args.doc_len)

    def op(doc_ids):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return ops.rope_attention(q, k, v, cos, sin, doc_ids=doc_ids)

    def prototype():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return _doc_attention.doc_attention(q, k, v, cos, sin, docs)

    variants = {"plain": lambda: op(None), "doc_ids, today": lambda: op(docs), "doc_ids, prototype": prototype}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with ops.use("torch"):
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, fn in variants.items():
                start = time.perf_counter()
                out = fn()
                mid = time.perf_counter()
                out.backward(grad)
                end = time.perf_counter()
                qkv.grad = None
                if r:
                    times[name].append((mid - start, end - mid))
    computed = sum((q1 - q0) * (q1 - k0) for q0, q1, k0 in _doc_attention.chunks(docs, _doc_attention.CHUNK))
    print(f"{args.preset}: B={B} H={H} T={T} D={D}, {int(docs[:, -1].sum()) + B} documents, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds; the prototype's kernel calls "
          f"cover {100 * computed / T**2:.1f}% of the T^2 (query, key) pairs")
    plain = [f + b for f, b in times["plain"]]
    for name, rows in times.items():
        fwd, bwd = statistics.median(f for f, _ in rows), statistics.median(b for _, b in rows)
        ratios = [(f + b) / p for (f, b), p in zip(rows, plain, strict=True)]
        print(f"{name:20s} fwd {1e3 * fwd:7.1f} ms  bwd {1e3 * bwd:7.1f} ms  "
              f"vs plain {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
