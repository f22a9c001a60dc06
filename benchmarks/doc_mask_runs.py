"""Training with and without document masking at equal steps: val loss and tokens/s.

    uv run python benchmarks/doc_mask_runs.py tiny --seeds 1 2 3
    uv run python benchmarks/doc_mask_runs.py baby_cpu --seeds 1 2 --set max_iters=150 warmup_iters=15 eval_interval=150

For each seed, `train.py --config PRESET --doc_mask true` and `--doc_mask false` run at the
same time, one thread each (OMP_NUM_THREADS=1), so on a shared machine both see the same
load and the pair's ratios hold even when the times swing. Each run writes to
OUT/PRESET-seedS-{mask,nomask}/. Reported per run: the final val loss the loop logged (in
the run's own setting: with doc_ids when it trained with them), the median tokens/s over
its log intervals (the first dropped: warm-up), and both final models scored on the same
val batches two ways: "alone" with doc_ids (every story from position 0 with nothing
before it, as generation sees a story) and "packed" without (stories see the ones before
them in the row). The last line of each pair and a summary are JSON (--json FILE too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def launch(preset: str, seed: int, doc_mask: bool, out: Path, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "train.py"), "--config", preset, "--seed", str(seed),
            "--doc_mask", str(doc_mask).lower(), "--out_dir", str(out), "--sample_at_end", "false",
            "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    proc.log = log
    return proc


def read_run(out: Path) -> dict:
    from tsfast.plot import read_metrics

    train, evals = read_metrics(out)
    rates = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    return {"step": evals[-1]["step"], "val_loss": evals[-1]["val_loss"],
            "tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates}


@torch.no_grad()
def score(out: Path) -> dict:
    """The final model's val loss on the run's eval batches, alone (doc_ids) and packed."""
    from tsfast.config import TrainConfig
    from tsfast.model import GPT
    from tsfast.train import checkpoint as ckpt_io
    from tsfast.train import data as data_mod

    torch.set_num_threads(1)
    ckpt = ckpt_io.read_checkpoint(out / "resume.pt", resume=True)
    cfg = dataclasses.replace(TrainConfig(**ckpt_io.saved_train_config(ckpt)), doc_mask=True)
    model = GPT(ckpt_io.model_config_of(ckpt))
    ckpt_io.load_model_state(model, ckpt)
    model.eval()
    corpus = data_mod.open_corpus(cfg, vocab_state=ckpt["vocab"], prepare=False)
    _, evals = data_mod.samplers(corpus, cfg, rank=0, device=torch.device("cpu"))
    alone, packed = [], []
    for i in range(cfg.eval_iters):
        x, y, doc_ids = evals["val"].batch(i)
        alone.append(model(x, y, doc_ids=doc_ids)[1].item())
        packed.append(model(x, y)[1].item())
    return {"alone": statistics.fmean(alone), "packed": statistics.fmean(packed)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=("tiny", "baby_cpu"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both runs")
    ap.add_argument("--out", type=Path, default=Path("out/doc_mask_runs"))
    ap.add_argument("--json", type=Path, help="also write every result here")
    args = ap.parse_args(argv)
    extra = [a for kv in args.set for a in ("--set", kv)]
    results = []
    for seed in args.seeds:
        outs = {m: (args.out / f"{args.preset}-seed{seed}-{'mask' if m else 'nomask'}").resolve() for m in (True, False)}
        procs = {m: launch(args.preset, seed, m, outs[m], extra) for m in (True, False)}
        for m, proc in procs.items():
            if proc.wait() != 0:
                sys.exit(f"run failed (exit {proc.returncode}): see {outs[m] / 'train.log'}")
            proc.log.close()
        pair = {"preset": args.preset, "seed": seed, "overrides": args.set, "load_avg_1min": os.getloadavg()[0]}
        for m in (True, False):
            key = "mask" if m else "nomask"
            pair[key] = read_run(outs[m]) | {"scored": score(outs[m])}
        pair["tokens_per_s_ratio"] = pair["mask"]["tokens_per_s"] / pair["nomask"]["tokens_per_s"]
        pair["val_loss_delta"] = pair["mask"]["val_loss"] - pair["nomask"]["val_loss"]
        results.append(pair)
        print(json.dumps(pair), flush=True)
    summary = {"preset": args.preset, "seeds": args.seeds, "overrides": args.set}
    for key in ("mask", "nomask"):
        summary[key] = {
            "val_loss": statistics.median(p[key]["val_loss"] for p in results),
            "alone": statistics.median(p[key]["scored"]["alone"] for p in results),
            "packed": statistics.median(p[key]["scored"]["packed"] for p in results),
            "tokens_per_s": statistics.median(p[key]["tokens_per_s"] for p in results),
        }
    ratios = [p["tokens_per_s_ratio"] for p in results]
    deltas = [p["val_loss_delta"] for p in results]
    summary["tokens_per_s_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    summary["val_loss_delta"] = {"median": statistics.median(deltas), "min": min(deltas), "max": max(deltas)}
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"pairs": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
