"""Plots of a training run and of the benchmark results (matplotlib, PNG files).

    uv run python -m tsfast.plot out/                  # out/metrics.jsonl -> out/metrics.png
    uv run python -m tsfast.plot out/ -o run.png
    uv run python -m tsfast.plot --bench .benchmarks/ -o benchmarks/plots/

A run: `out/metrics.jsonl` as the training loop writes it (tsfast/train/logs.py), one JSON
object a line: {"type": "train", "step", "loss", "lr", "ms", "tokens_per_s", "tflops", "mfu"}
and {"type": "eval", "step", "train_loss", "val_loss", "best_val_loss"}. Three panels: loss
(the logged training loss, and the evaluated train and val losses), learning rate, and
throughput (tokens/s, with model TFLOPS on a second axis). A run still being written may
end in a half-written line: it is skipped.

Benchmarks: the JSON files the benchmark suite writes (benchmarks/conftest.py):
`ops.json` -> ops.png (per-op TFLOPS or GB/s by provider, one panel per unit and shape),
`train_step.json` -> train_step.png (tokens/s by preset and provider, labelled with model
TFLOPS and MFU), `generate.json` -> generate.png (tokens/s with and without the KV cache),
`generate_batched.json` -> generate_batched.png (batched decoding against one sequence at a
time, and the demo's users queued and together).

matplotlib is imported when a plot is drawn (the Agg backend: no display needed), never at
import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["read_metrics", "run_figure", "plot_run", "ops_figure", "train_step_figure",
           "generate_figure", "generate_batched_figure", "plot_benchmarks", "main"]

METRICS_FILE = "metrics.jsonl"


class PlotError(ValueError):
    """A missing or unreadable input file, with what to do about it."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- a run


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl (or of the run directory holding
    one), in file order. Blank and half-written lines are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"no metrics file at {path}: train first (uv run train.py writes out/{METRICS_FILE})")
    train, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        kind = rec.get("type", "train")
        if kind == "train" and "step" in rec:
            train.append(rec)
        elif kind == "eval" and "step" in rec:
            evals.append(rec)
    if not train and not evals:
        raise PlotError(f"{path} holds no train or eval records")
    return train, evals


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def run_figure(train: list[dict], evals: list[dict], title: str = ""):
    """The three-panel figure of one run (loss, learning rate, throughput)."""
    plt = _pyplot()
    fig, (ax_loss, ax_lr, ax_tp) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(*_series(train, "loss"), label="train loss (logged)", color="tab:blue", lw=1)
    for key, style in (("train_loss", dict(color="tab:green", marker="o")),
                       ("val_loss", dict(color="tab:red", marker="s"))):
        steps, values = _series(evals, key)
        if steps:
            ax_loss.plot(steps, values, label=key.replace("_", " ") + " (eval)", lw=1.5, **style)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)

    ax_lr.plot(*_series(train, "lr"), color="tab:purple", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)

    ax_tp.plot(*_series(train, "tokens_per_s"), color="tab:orange", lw=1.2, label="tokens/s")
    ax_tp.set_ylabel("tokens / s")
    ax_tp.set_xlabel("iteration")
    ax_tp.grid(alpha=0.3)
    steps, tflops = _series(train, "tflops")
    if steps:
        ax_tf = ax_tp.twinx()
        ax_tf.plot(steps, tflops, color="tab:gray", lw=0.8, ls="--", label="model TFLOPS")
        ax_tf.set_ylabel("model TFLOPS")
        ax_tp.legend(handles=ax_tp.get_lines() + ax_tf.get_lines(), loc="lower right")
    fig.suptitle(title or "training run")
    fig.tight_layout()
    return fig


def plot_run(path: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's metrics to a PNG (default: metrics.png next to metrics.jsonl)."""
    path = Path(path)
    train, evals = read_metrics(path)
    run_dir = path if path.is_dir() else path.parent
    out = Path(out) if out is not None else run_dir / "metrics.png"
    fig = run_figure(train, evals, title=f"{run_dir}: {len(train)} log lines, {len(evals)} evaluations")
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    _pyplot().close(fig)
    return out


# ----------------------------------------------------------------------------- benchmarks


def _read_bench(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PlotError(f"cannot read benchmark results {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise PlotError(f"{path} is not a benchmark results file (no 'rows' list)")
    return data


def _subtitle(data: dict) -> str:
    return f"{data.get('device', '?')}, torch {data.get('torch', '?')}, {data.get('created', '')}"


# One colour per provider in every panel and figure.
_COLORS = {"torch": "tab:blue", "torch.compile": "tab:orange", "triton": "tab:green",
           "no_cache": "tab:gray", "kv_cache": "tab:purple", "queued": "tab:gray", "together": "tab:purple"}


def _grouped_bars(ax, groups: list[str], providers: list[str], value) -> list[str]:
    """Bars of value(group, provider) (None: no bar), side by side per group, for the
    providers that have at least one bar here; returns those providers, in order."""
    providers = [p for p in providers if any(value(g, p) is not None for g in groups)]
    width = 0.8 / max(len(providers), 1)
    for i, prov in enumerate(providers):
        xs, ys = [], []
        for g, group in enumerate(groups):
            v = value(group, prov)
            if v is not None:
                xs.append(g + (i - (len(providers) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width=width, label=prov, color=_COLORS.get(prov))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return providers


def ops_figure(data: dict):
    """Per-op throughput by provider: one panel per (rate unit, shape)."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if r.get("rate")]
    panels = sorted({(r["rate_unit"], r["shape"]) for r in rows})
    if not panels:
        raise PlotError("the ops results hold no rates to plot")
    providers = sorted({r["provider"] for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (unit, shape) in zip(axes[:, 0], panels, strict=True):
        sel = [r for r in rows if r["rate_unit"] == unit and r["shape"] == shape]
        groups = list(dict.fromkeys(f"{r['op']} {r['mode']}" for r in sel))
        table = {(f"{r['op']} {r['mode']}", r["provider"]): r["rate"] for r in sel}
        _grouped_bars(ax, groups, providers, lambda g, p, t=table: t.get((g, p)))
        ax.set_ylabel(unit)
        ax.set_title(f"{shape} shape, {unit}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("per-op throughput by provider\n" + _subtitle(data), fontsize=10)
    fig.tight_layout()
    return fig


def train_step_figure(data: dict):
    """Training-step tokens/s by preset and provider, bars labelled with TFLOPS and MFU."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if r.get("tokens_per_s")]
    if not rows:
        raise PlotError("the train_step results hold no tokens_per_s to plot")
    presets = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    table = {(r["shape"], r["provider"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    providers = _grouped_bars(ax, presets, providers,
                              lambda g, p: table[(g, p)]["tokens_per_s"] if (g, p) in table else None)
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        for g, name in enumerate(presets):
            r = table.get((name, prov))
            if r is None:
                continue
            label = f"{1e3 * r['rate']:.1f} GFLOP/s" if r.get("rate") else ""
            if r.get("mfu") is not None:
                label += f"\n{100 * r['mfu']:.0f}% {'of mm' if data.get('device') == 'cpu' else 'MFU'}"
            ax.annotate(label, (g + (i - (len(providers) - 1) / 2) * width, r["tokens_per_s"]),
                        ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log)")
    ax.legend(fontsize=8)
    ax.set_title("training step (forward, backward, clip, AdamW)\n" + _subtitle(data), fontsize=10)
    fig.tight_layout()
    return fig


def generate_figure(data: dict):
    """Generation tokens/s by model and length, with and without the KV cache."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if r.get("tokens_per_s")]
    if not rows:
        raise PlotError("the generate results hold no tokens_per_s to plot")
    groups = list(dict.fromkeys(f"{r['shape']} {r['new_tokens']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    table = {(f"{r['shape']} {r['new_tokens']}", r["provider"]): r["tokens_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _grouped_bars(ax, groups, providers, lambda g, p: table.get((g, p)))
    ax.set_ylabel("new tokens / s")
    ax.set_xlabel("model and new tokens")
    ax.legend(fontsize=8)
    ax.set_title("generation, batch 1\n" + _subtitle(data), fontsize=10)
    fig.tight_layout()
    return fig


def generate_batched_figure(data: dict):
    """Aggregate tokens/s against batch size, batched and one at a time, per model; and the
    demo's time until the last of its users' stories is done, queued and together."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if r.get("op") == "generate_batched" and r.get("tokens_per_s")]
    demo = [r for r in data["rows"] if r.get("op") == "demo" and r.get("last_finish_s")]
    if not rows and not demo:
        raise PlotError("the generate_batched results hold no rows to plot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for i, shape in enumerate(dict.fromkeys(r["shape"] for r in rows)):
        for provider, style in (("batched", "-o"), ("one_at_a_time", "--s")):
            sel = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["shape"] == shape and r["provider"] == provider)
            if sel:
                ax.plot([b for b, _ in sel], [t for _, t in sel], style, color=f"C{i}", label=f"{shape}, {provider}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("aggregate new tokens / s (log)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("batched decoding vs one at a time", fontsize=10)
    ax = axes[1]
    def group(r):  # a model, and the story length when the rows hold more than one
        tokens = r.get("dims", {}).get("new_tokens")
        return f"{r['shape']}\n{tokens} tokens" if tokens is not None else r["shape"]

    groups = list(dict.fromkeys(group(r) for r in demo))
    table = {(group(r), r["provider"]): r["last_finish_s"] for r in demo}
    _grouped_bars(ax, groups, ["queued", "together"], lambda g, p: table.get((g, p)))
    ax.set_ylabel("seconds until the last story is done")
    ax.legend(fontsize=8)
    users = demo[0]["dims"]["users"] if demo else "?"
    ax.set_title(f"demo, {users} users at once", fontsize=10)
    fig.suptitle("generation, batched\n" + _subtitle(data), fontsize=10)
    fig.tight_layout()
    return fig


_BENCH_PLOTS = {"ops": ops_figure, "train_step": train_step_figure, "generate": generate_figure,
                "generate_batched": generate_batched_figure}


def plot_benchmarks(bench_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw every benchmark results file found in bench_dir (ops, train_step, generate
    .json) to out_dir/<suite>.png; returns the files written."""
    bench_dir, out_dir = Path(bench_dir), Path(out_dir)
    written = []
    for suite, figure in _BENCH_PLOTS.items():
        path = bench_dir / f"{suite}.json"
        if path.is_file():
            written.append(_save(figure(_read_bench(path)), out_dir / f"{suite}.png"))
    if not written:
        raise PlotError(f"no {', '.join(s + '.json' for s in _BENCH_PLOTS)} in {bench_dir}: "
                        "run `uv run pytest benchmarks --benchmark-only` first")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tsfast.plot", description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a run directory (holding metrics.jsonl) or a metrics .jsonl file")
    ap.add_argument("-o", "--out", help="output PNG for a run (default RUN/metrics.png); output directory with --bench")
    ap.add_argument("--bench", metavar="DIR", help="plot the benchmark results in DIR (e.g. .benchmarks/)")
    args = ap.parse_args(argv)
    if (args.run is None) == (args.bench is None):
        ap.error("give a run directory, or --bench DIR")
    try:
        if args.bench is not None:
            paths = plot_benchmarks(args.bench, args.out or "benchmarks/plots")
        else:
            paths = [plot_run(args.run, args.out)]
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
