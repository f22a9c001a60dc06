"""Shared machinery of the benchmark suite (`uv run pytest benchmarks --benchmark-only`).

Each benchmark calls the `record_bench` fixture once with its figures; at the end of the
session a table of all of them is printed (op, provider, mode, shape, median ms, TFLOPS or
GB/s, peak MB) and, for each suite, the rows are written as JSON for plotting:

    .benchmarks/<suite>.json   (e.g. .benchmarks/ops.json; next to pytest-benchmark's own
                                .benchmarks/ storage, which git ignores)
    {"device": "NVIDIA H100 80GB HBM3" | "cpu", "torch": "2.15.0", "created": ISO time,
     "rows": [{"suite", "name", "op", "provider", "mode", "shape", "dims": {...},
               "dtype", "median_ms", "rate", "rate_unit": "TFLOPS" | "GB/s", "peak_mb"}, ...]}

`median_ms` is triton.testing.do_bench's median on CUDA and pytest-benchmark's median round
on CPU. `peak_mb` is the memory one call adds at its peak: CUDA max_memory_allocated above
what was allocated before; on CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) above its RSS before, after malloc_trim has handed glibc's free heap
memory back to the kernel, so that memory the call reuses shows in RSS again (tracemalloc
does not see torch's allocations; a sampling thread would miss short peaks).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
from bench_utils import on_gpu

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

_rows: list[dict] = []


# ----------------------------------------------------------------------------- recording


@pytest.fixture
def record_bench(request, benchmark):
    """record_bench(suite=..., op=..., provider=..., mode=..., shape=..., median_ms=..., ...):
    store the row in pytest-benchmark's extra_info and in the end-of-session table."""

    def record(**row):
        row = {"suite": "ops", "name": request.node.name, **row}
        benchmark.extra_info.update(row)
        _rows.append(row)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _rows:
        return
    tr = terminalreporter
    tr.section("tsfast benchmarks")
    header = f"{'op':<24} {'provider':<13} {'mode':<16} {'shape':<9} {'median ms':>10} {'rate':>16} {'peak MB':>9}"
    tr.write_line(header)
    tr.write_line("-" * len(header))
    for r in _rows:
        rate = f"{r['rate']:.3g} {r['rate_unit']}" if r.get("rate") else "-"
        peak = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "n/a"
        tr.write_line(f"{r['op']:<24} {r['provider']:<13} {r['mode']:<16} {r['shape']:<9} "
                      f"{r['median_ms']:>10.3f} {rate:>16} {peak:>9}")
    out_dir = Path(config.rootpath) / ".benchmarks"
    out_dir.mkdir(exist_ok=True)
    for suite in sorted({r["suite"] for r in _rows}):
        path = out_dir / f"{suite}.json"
        path.write_text(json.dumps({
            "device": torch.cuda.get_device_name() if on_gpu() else "cpu",
            "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "rows": [r for r in _rows if r["suite"] == suite],
        }, indent=1))
        tr.write_line(f"wrote {path}")
