"""`python -m tsfast.gpucheck` on CPU: exit 2 with one line; its orchestration (parts in their
own process groups, saved after each, a part over budget cut off keeping its rows, a failing
part, running out of time) with stand-in parts; the Markdown from a recorded sample, which is
a SYNTHETIC fixture (tests/fixtures/gpucheck_sample.json: invented numbers, not a measurement);
and the loss-agreement rule of the convergence part."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsfast.gpucheck import report
from tsfast.gpucheck.__main__ import Part, run_check

FIXTURE = Path(__file__).parent / "fixtures" / "gpucheck_sample.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tsfast.gpucheck", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "tsfast.gpucheck" in lines[0]
    assert not (tmp_path / "out").exists()


def _part(name, code, budget=30.0):
    return Part(name, budget, [sys.executable, "-c", code, "{rows}", "{out}"])


WRITE = "import json, sys; f = open(sys.argv[1], 'a'); f.write(json.dumps({row}) + '\\n'); f.flush()\n"


def test_parts_run_in_order_each_saved_as_it_finishes(tmp_path):
    out = tmp_path / "out"
    saw_first = (
        "import json, sys, pathlib\n"
        "state = json.loads((pathlib.Path(sys.argv[2]) / 'gpucheck.json').read_text())\n"
        "assert state['parts']['environment']['status'] == 'done', state\n"
        + WRITE.replace("{row}", "{'kind': 'tests', 'label': 'x', 'passed': 3, 'failed': 0, 'skipped': 1, "
                                 "'seconds': 1.0}")
    )
    grandchild = tmp_path / "grandchild.pid"
    hang = (
        WRITE.replace("{row}", "{'kind': 'selection', 'preset': 'baby_gpu', 'op': 'toy', 'shape': 'N=1', "
                               "'mode': 'fwd', 'candidates': ['a'], 'backends': ['torch'], 'ms': {'a': 1.0}, "
                               "'chosen': 'a', 'source': 'measured'}")
        + f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
        + "time.sleep(300)\n"
    )
    parts = [
        _part("environment", WRITE.replace("{row}", "{'kind': 'environment', 'gpu': 'stand-in'}"), budget=2.0),
        _part("gpu_tests", saw_first, budget=2.0),
        _part("selection", hang, budget=3.0),
        _part("per_op", "import sys; print('boom'); sys.exit(3)"),
        _part("train_step", "import time; time.sleep(300)", budget=300.0),
        _part("convergence", "pass"),
    ]
    # budget 14 s: selection gets its 3 s plus what the first two left, train_step the rest
    state = run_check(parts, out, 14.0, header={"gpu": "stand-in", "started": "2000-01-01T00:00:00"})
    got = {name: p["status"] for name, p in state["parts"].items()}
    assert got["environment"] == got["gpu_tests"] == "done"
    assert got["selection"].startswith("cut off") and len(state["parts"]["selection"]["rows"]) == 1
    assert got["per_op"] == "failed (exit 3)" and "boom" in state["parts"]["per_op"]["log_tail"]
    assert got["train_step"].startswith("cut off") and got["convergence"] == "not run: out of time"
    assert json.loads((out / "gpucheck.json").read_text()) == state
    md = (out / "gpucheck.md").read_text()
    assert "*cut off at its" in md and "*not run: out of time*" in md and "| x | 3 | 0 | 1 | 1 |" in md
    pid = int(grandchild.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], \
        "a stopped part's children must stop with it"


def test_markdown_from_the_recorded_synthetic_sample():
    state = json.loads(FIXTURE.read_text())
    assert state["fixture"].startswith("SYNTHETIC")
    md = report.markdown(state)
    assert md.startswith("## GPU check: FAKE-GPU (fixture) (2000-01-01)")
    assert "> **SYNTHETIC TEST FIXTURE" in md  # a fixture can never pass for a measurement
    for title in report.TITLES.values():
        assert f"### {title}" in md
    assert "| baby_gpu | linear_cross_entropy |" in md and "| **triton** | 9 | 12 | skipped | 1.33x |" in md
    assert "| layernorm_linear | baby_gpu | forward+backward | 1 | 1.25 | 1.1 | 1.25x |" in md
    assert "triton: RuntimeError: fixture error" in md
    assert "*cut off at its 90 s budget*" in md and "*failed (exit 1)*" in md and "Traceback: fixture" in md
    assert "`tests/test_x.py::test_y: fixture failure`" in md
    assert "| baby_gpu | triton | 100 | 327,680 | 50 | 5.0% | 20.00 |" in md
    assert "Verdict: **both fall and agree**" in md
    lines = md.splitlines()
    for i, line in enumerate(lines):  # every table row has as many cells as the row above it
        if line.startswith("|") and lines[i - 1].startswith("|"):
            assert line.count("|") == lines[i - 1].count("|"), line


def _curve(offset=0.0, scale=1.0):
    return [[s, scale * 10.8 * math.exp(-s / 120) + 2.0 + offset] for s in range(10, 301, 10)]


@pytest.mark.parametrize("b, verdict", [
    (_curve(0.02), "both fall and agree"),
    (_curve(0.5), "the losses disagree beyond bf16 noise"),
    ([[s, 10.8] for s in range(10, 301, 10)], "a loss does not fall by 1 nat"),
    ([[10, 10.0]], "not enough logged iterations to judge"),
])
def test_loss_agreement(b, verdict):
    assert report.agreement(_curve(), b)["verdict"] == verdict
