"""The whole GPU story in one command, for the first minutes on a CUDA machine:

    uv run python -m tsfast.gpucheck [--out out/gpucheck] [--minutes 8] [--parts a,b]

Runs, most important first, each part in its own process with its own time budget (time a
part leaves unused passes to the next; the whole stays within --minutes):

    environment   GPU, driver, CUDA runtime, torch and Triton versions, the MFU peak      20 s
    gpu_tests     `pytest -m gpu`, then the parity suite (bf16, every op and candidate),
                  the compile tests and the kernels in the model, natively               150 s
    selection     what --kernels auto chooses for baby_gpu and gpt2, measured now          60 s
    per_op        Triton vs torch eager vs torch.compile, forward / backward / both, at
                  the baby_gpu and gpt2 shapes (benchmarks/test_ops.py's cases)            90 s
    train_step    one optimizer step of baby_gpu and gpt2 per provider: tokens/s, MFU,
                  peak memory (benchmarks/test_train_step.py's Step)                       70 s
    convergence   300 iterations of baby_gpu on the synthetic corpus with --kernels
                  triton and torch: both losses fall and agree within bf16's noise         90 s

After each part, OUT/gpucheck.json (everything) and OUT/gpucheck.md (a section ready to
paste into BENCHMARKS.md) are rewritten, so a run cut off at any point keeps what it
measured; a part over its budget is stopped and keeps the figures it had written. Needs a
checkout of the repository (it reuses tests/ and benchmarks/). Without a usable CUDA GPU
it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tsfast.gpucheck import report

REPO = Path(__file__).resolve().parents[2]
EXIT_NO_GPU = 2


@dataclass
class Part:
    name: str
    budget_s: float
    # The process to run; "{rows}" (the JSONL file it appends rows to) and "{out}" are filled
    # in. Default: python -m tsfast.gpucheck.parts NAME {rows} {out}.
    command: list[str] = field(default_factory=list)


PARTS = [Part("environment", 20), Part("gpu_tests", 150), Part("selection", 60), Part("per_op", 90),
         Part("train_step", 70), Part("convergence", 90)]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off when the part was stopped
                pass
    return rows


def run_part(part: Part, out: Path, limit_s: float) -> dict:
    """Run one part in its own process group (so a stopped part takes its pytest or
    train.py children with it); its rows, status and time."""
    rows_path = out / f"{part.name}.jsonl"
    rows_path.unlink(missing_ok=True)
    template = part.command or [sys.executable, "-m", "tsfast.gpucheck.parts", part.name, "{rows}", "{out}"]
    command = [a.replace("{rows}", str(rows_path)).replace("{out}", str(out)) for a in template]
    log_path = out / f"{part.name}.log"
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit_s, 1.0))
            status = "done" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"cut off at its {limit_s:.0f} s budget"
    result = {"status": status, "seconds": round(time.monotonic() - start, 1), "budget_s": round(limit_s, 1),
              "rows": _read_rows(rows_path)}
    if status.startswith("failed"):
        result["log_tail"] = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    return result


def run_check(parts: list[Part], out: Path, total_s: float, *, header: dict) -> dict:
    """Run the parts in order within total_s, saving JSON and Markdown after each."""
    out.mkdir(parents=True, exist_ok=True)
    state = {**header, "budget_s": total_s, "parts": {}}
    deadline = time.monotonic() + total_s
    slack = 0.0
    for part in parts:
        left = deadline - time.monotonic()
        if left < 1.0:
            state["parts"][part.name] = {"status": "not run: out of time", "rows": []}
        else:
            limit = min(part.budget_s + slack, left)
            print(f"gpucheck: {part.name} (up to {limit:.0f} s) ...", flush=True)
            result = run_part(part, out, limit)
            slack = max(0.0, limit - result["seconds"])
            state["parts"][part.name] = result
            print(f"gpucheck: {part.name} {result['status']} in {result['seconds']:.0f} s", flush=True)
        _write_atomic(out / "gpucheck.json", json.dumps(state, indent=1))
        _write_atomic(out / "gpucheck.md", report.markdown(state))
    return state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tsfast.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/gpucheck", help="where gpucheck.json and gpucheck.md go")
    ap.add_argument("--minutes", type=float, default=8.0, help="time for the whole check (default: 8)")
    ap.add_argument("--parts", default=",".join(p.name for p in PARTS), help="a comma-separated subset")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        from tsfast.train.runtime import unusable_gpu

        why = unusable_gpu()
        print(f"tsfast.gpucheck: {why or 'no CUDA GPU here (torch.cuda.is_available() is False)'}; "
              "it measures CUDA GPUs only", file=sys.stderr)
        return EXIT_NO_GPU
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - {p.name for p in PARTS})
    if unknown:
        print(f"tsfast.gpucheck: unknown part(s) {', '.join(unknown)}; the parts are "
              f"{', '.join(p.name for p in PARTS)}", file=sys.stderr)
        return EXIT_NO_GPU
    header = {"tool": "tsfast.gpucheck", "format": 1, "gpu": torch.cuda.get_device_name(0),
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    out = Path(args.out)
    run_check([p for p in PARTS if p.name in wanted], out, 60.0 * args.minutes, header=header)
    print(f"gpucheck: wrote {out / 'gpucheck.json'} and {out / 'gpucheck.md'} (paste it into BENCHMARKS.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
