"""tsfast.plot: a run's metrics.jsonl and the benchmark JSON files to PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tsfast import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, *, partial_tail=True):
    lines = []
    for step in range(10, 110, 10):
        lines.append({"type": "train", "step": step, "loss": 10.0 - step / 20, "lr": 1e-3 * step / 100,
                      "ms": 50.0, "tokens_per_s": 1000.0 + step, "tflops": 0.01 * step, "mfu": None})
        if step % 50 == 0:
            lines.append({"type": "eval", "step": step, "train_loss": 9.0 - step / 25,
                          "val_loss": 9.1 - step / 25, "best_val_loss": 9.1 - step / 25})
    text = "\n".join(json.dumps(r) for r in lines) + "\n\n"
    if partial_tail:
        text += '{"type": "train", "step": 110, "lo'  # a line the loop is still writing
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)
    return lines


def _png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_read_metrics_splits_records_and_skips_a_half_written_line(tmp_path):
    lines = _write_run(tmp_path)
    train, evals = plot.read_metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(10, 110, 10))
    assert [r["step"] for r in evals] == [50, 100]
    assert train == [r for r in lines if r["type"] == "train"]


def test_run_figure_draws_the_recorded_values(tmp_path):
    _write_run(tmp_path)
    train, evals = plot.read_metrics(tmp_path / "metrics.jsonl")
    fig = plot.run_figure(train, evals)
    ax_loss, ax_lr, ax_tp = fig.axes[:3]
    logged = ax_loss.get_lines()[0]
    assert list(logged.get_xdata()) == [r["step"] for r in train]
    assert list(logged.get_ydata()) == [r["loss"] for r in train]
    val = [ln for ln in ax_loss.get_lines() if ln.get_label().startswith("val loss")][0]
    assert list(val.get_ydata()) == [r["val_loss"] for r in evals]
    assert list(ax_lr.get_lines()[0].get_ydata()) == [r["lr"] for r in train]
    assert list(ax_tp.get_lines()[0].get_ydata()) == [r["tokens_per_s"] for r in train]
    assert list(fig.axes[3].get_lines()[0].get_ydata()) == [r["tflops"] for r in train]  # twin axis


def test_cli_writes_metrics_png_next_to_the_run(tmp_path):
    run = tmp_path / "out"
    _write_run(run)
    proc = subprocess.run([sys.executable, "-m", "tsfast.plot", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {run / 'metrics.png'}" in proc.stdout
    _png(run / "metrics.png")


def test_cli_explains_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tsfast.plot", str(tmp_path / "nowhere")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no metrics file" in proc.stderr and "train.py" in proc.stderr


def test_a_file_with_no_records_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(plot.PlotError, match="no train or eval records"):
        plot.read_metrics(tmp_path)


def _bench_files(d):
    meta = {"device": "cpu", "torch": "2.15.0", "created": "2026-11-24T00:00:00+00:00"}
    ops_rows = []
    for op, unit in (("rope_attention", "TFLOPS"), ("layer_norm", "GB/s")):
        for provider, rate in (("torch", 0.02), ("torch.compile", 0.03)):
            ops_rows.append({"suite": "ops", "op": op, "provider": provider, "mode": "forward",
                             "shape": "baby_gpu", "median_ms": 1.0, "rate": rate if unit == "TFLOPS" else 10 * rate,
                             "rate_unit": unit, "peak_mb": 1.0})
    ops_rows.append({"suite": "ops", "op": "layer_norm", "provider": "triton", "mode": "forward",
                     "shape": "baby_gpu", "median_ms": 1.0, "rate": None, "rate_unit": "GB/s", "peak_mb": None})
    step_rows = [{"suite": "train_step", "op": "train_step", "provider": p, "mode": "step", "shape": s,
                  "median_ms": 100.0, "rate": 0.05, "rate_unit": "TFLOPS", "tokens_per_s": tps, "mfu": 0.8}
                 for s, p, tps in (("tiny", "torch", 20000.0), ("baby_cpu", "torch", 900.0),
                                   ("baby_cpu", "torch.compile", 950.0))]
    gen_rows = [{"suite": "generate", "op": "generate", "provider": p, "mode": "m", "shape": "tiny",
                 "new_tokens": 100, "median_ms": 1.0, "rate": tps, "rate_unit": "tok/s", "tokens_per_s": tps}
                for p, tps in (("no_cache", 100.0), ("kv_cache", 500.0))]
    for name, rows in (("ops", ops_rows), ("train_step", step_rows), ("generate", gen_rows)):
        (d / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}))


def test_benchmark_plots_from_the_suite_json(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    _bench_files(bench)
    out = tmp_path / "plots"
    written = plot.plot_benchmarks(bench, out)
    assert sorted(p.name for p in written) == ["generate.png", "ops.png", "train_step.png"]
    for p in written:
        _png(p)
    fig = plot.ops_figure(json.loads((bench / "ops.json").read_text()))
    heights = sorted(round(b.get_height(), 6) for ax in fig.axes for b in ax.patches)
    assert heights == [0.02, 0.03, 0.2, 0.3]  # the row without a rate draws no bar
    fig = plot.train_step_figure(json.loads((bench / "train_step.json").read_text()))
    assert sorted(b.get_height() for b in fig.axes[0].patches) == [900.0, 950.0, 20000.0]


def test_cli_bench_without_results_says_how_to_make_them(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tsfast.plot", "--bench", str(tmp_path), "-o", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "pytest benchmarks --benchmark-only" in proc.stderr


def test_generate_batched_plot_draws_tokens_per_s_against_batch_size(tmp_path):
    rows = [{"suite": "generate_batched", "op": "generate_batched", "provider": p, "mode": f"{b} sequences",
             "shape": "tiny", "batch": b, "median_ms": 1.0, "rate": tps, "rate_unit": "tok/s", "tokens_per_s": tps}
            for b in (1, 2, 4, 8) for p, tps in (("one_at_a_time", 100.0), ("batched", 90.0 * b))]
    rows += [{"suite": "generate_batched", "op": "demo", "provider": p, "mode": f"8 users, {n} tokens", "shape": "tiny",
              "dims": {"users": 8, "new_tokens": n}, "median_ms": 1e3 * s, "rate": 1.0, "rate_unit": "tok/s",
              "last_finish_s": s}
             for n, scale in ((64, 1.0), (200, 3.0)) for p, s in (("queued", 12.0 * scale), ("together", 3.0 * scale))]
    (tmp_path / "generate_batched.json").write_text(json.dumps({"device": "cpu", "rows": rows}))
    written = plot.plot_benchmarks(tmp_path, tmp_path / "plots")
    assert [p.name for p in written] == ["generate_batched.png"]
    _png(written[0])
    fig = plot.generate_batched_figure(json.loads((tmp_path / "generate_batched.json").read_text()))
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}
    assert lines["tiny, batched"] == ([1, 2, 4, 8], [90.0, 180.0, 360.0, 720.0])
    assert lines["tiny, one_at_a_time"] == ([1, 2, 4, 8], [100.0] * 4)
    assert sorted(b.get_height() for b in fig.axes[1].patches) == [3.0, 9.0, 12.0, 36.0]  # one bar per length
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["tiny\n64 tokens", "tiny\n200 tokens"]
