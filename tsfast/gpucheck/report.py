"""The GPU check's results as a Markdown section for BENCHMARKS.md."""

from __future__ import annotations

import statistics


def agreement(losses_a: list, losses_b: list) -> dict:
    """Whether both loss curves fall, and agree within what bf16 explains: two bf16 runs
    that differ only in reduction order drift apart by a few hundredths of a nat over a few
    hundred steps; a wrong gradient shows as a gap beyond that. Tolerance on the mean of the
    last five logged losses: 0.05 + 2% of the loss."""
    if len(losses_a) < 6 or len(losses_b) < 6:
        return {"verdict": "not enough logged iterations to judge"}
    a = dict(losses_a)
    b = dict(losses_b)
    steps = sorted(set(a) & set(b))
    last = steps[-5:]
    end_a, end_b = statistics.fmean(a[s] for s in last), statistics.fmean(b[s] for s in last)
    falls = all(curve[steps[0]] - statistics.fmean(curve[s] for s in last) > 1.0 for curve in (a, b))
    gap = abs(end_a - end_b)
    tolerance = 0.05 + 0.02 * min(end_a, end_b)
    agrees = gap <= tolerance
    verdict = ("both fall and agree" if falls and agrees else
               "a loss does not fall by 1 nat" if not falls else "the losses disagree beyond bf16 noise")
    return {"first": [a[steps[0]], b[steps[0]]], "end": [end_a, end_b], "gap": gap, "tolerance": tolerance,
            "falls": falls, "agrees": agrees, "verdict": verdict,
            "max_gap": max(abs(a[s] - b[s]) for s in steps)}


TITLES = {
    "environment": "Environment",
    "gpu_tests": "Tests on the GPU",
    "selection": "Measured selection (`--kernels auto`) for a training run of each preset",
    "per_op": "Per op, bf16: Triton vs torch eager vs torch.compile",
    "train_step": "One optimizer step (forward, backward, clip, AdamW; one micro-batch)",
    "convergence": "300 iterations of baby_gpu on the synthetic corpus",
}


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return lines


def _environment(rows):
    env = next((r for r in rows if r.get("kind") == "environment"), None)
    if env is None:
        return []
    keys = ["gpu", "gpus", "capability", "memory_gib", "sms", "driver", "cuda_runtime", "cudnn", "torch", "triton",
            "python", "mfu_peak_tflops", "bf16"]
    return _table(["what", "value"], [[k, env.get(k)] for k in keys])


def _tests(rows):
    out = _table(["run", "passed", "failed", "skipped", "seconds"],
                 [[r["label"], r["passed"], r["failed"], r["skipped"], r["seconds"]] for r in rows])
    for r in rows:
        out += [f"- failed ({r['label']}): `{f}`" for f in r.get("failures", [])]
    return out


def _selection(rows):
    names = list(dict.fromkeys(n for r in rows for n in r["candidates"]))
    body = []
    for r in rows:
        ms = r.get("ms", {})
        cells = [ms.get(n, "skipped" if n in r.get("skipped", {}) else "-") for n in names]
        torch_ms = [ms[n] for n, b in zip(r["candidates"], r["backends"], strict=True) if b == "torch" and n in ms]
        chosen = ms.get(r["chosen"])
        speedup = f"{min(torch_ms) / chosen:.2f}x" if torch_ms and chosen else "-"
        body.append([r["preset"], r["op"], r["shape"], r["mode"], f"**{r['chosen']}**", *cells, speedup])
    return _table(["preset", "op", "shape", "mode", "chosen", *(f"{n} ms" for n in names), "speedup vs torch"], body)


def _per_op(rows):
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["mode"]), {})[r["provider"]] = r
    body = []
    for (op, shape, mode), got in by_key.items():
        ms = {p: got[p].get("ms") for p in ("triton", "torch", "torch.compile") if p in got}
        tri, eager = ms.get("triton"), ms.get("torch")
        rate = " / ".join(_f(got[p].get("rate")) for p in ("triton", "torch", "torch.compile") if p in got)
        unit = next((g.get("unit") for g in got.values() if g.get("unit")), "")
        errors = "; ".join(f"{p}: {g['error'][:80]}" for p, g in got.items() if g.get("error"))
        body.append([op, shape, mode, ms.get("triton"), ms.get("torch"), ms.get("torch.compile"),
                     f"{eager / tri:.2f}x" if tri and eager else "-", f"{rate} {unit}".strip(),
                     " / ".join(_f(got[p].get("peak_mb"), 4) for p in ("triton", "torch", "torch.compile") if p in got),
                     errors or ""])
    return _table(["op", "shape", "mode", "Triton ms", "torch ms", "compile ms", "torch/Triton",
                   "rate (Triton / torch / compile)", "peak MB", "errors"], body)


def _train_step(rows):
    body = [[r["preset"], r["provider"], r.get("ms"), r.get("tokens_per_s"), r.get("tflops"),
             f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-",
             f"{r['peak_mb'] / 1024:.2f}" if r.get("peak_mb") else "-", r.get("error", "")[:100]] for r in rows]
    return _table(["preset", "provider", "ms", "tokens/s", "TFLOPS", "MFU", "peak GiB", "error"], body)


def _convergence(rows):
    runs = {r["kernels"]: r for r in rows}
    steps = sorted({s for r in rows for s, _ in r["losses"]})
    shown = [s for s in steps if s in (10, 50, 100, 200, 300) or s == steps[-1]] if steps else []
    body = []
    for kernels, r in runs.items():
        losses = dict(r["losses"])
        body.append([f"--kernels {kernels}", r["exit_code"], *(losses.get(s) for s in shown)])
    out = _table(["run", "exit", *(f"loss @ {s}" for s in shown)], body)
    if "triton" in runs and "torch" in runs:
        a = agreement(runs["triton"]["losses"], runs["torch"]["losses"])
        if "gap" in a:
            out.append(f"\nVerdict: **{a['verdict']}** (mean of the last five logged losses: "
                       f"Triton {a['end'][0]:.4f}, torch {a['end'][1]:.4f}; gap {a['gap']:.4f}, tolerance "
                       f"{a['tolerance']:.4f}; largest gap at one logged step {a['max_gap']:.4f}).")
        else:
            out.append(f"\nVerdict: {a['verdict']}.")
    for r in rows:
        if r.get("log_tail"):
            out += ["", f"--kernels {r['kernels']} failed; its log ends:", "```", r["log_tail"][-800:], "```"]
    return out


SECTIONS = {"environment": _environment, "gpu_tests": _tests, "selection": _selection, "per_op": _per_op,
            "train_step": _train_step, "convergence": _convergence}


def markdown(state: dict) -> str:
    """The Markdown section: a heading with the GPU and date, then one subsection per part
    (its status when it did not finish)."""
    lines = [f"## GPU check: {state.get('gpu', '?')} ({state.get('started', '?')[:10]})", ""]
    if state.get("fixture"):
        lines += [f"> **{state['fixture']}**", ""]
    spent = sum(p.get("seconds", 0) for p in state.get("parts", {}).values())
    lines += [f"Made by `uv run python -m tsfast.gpucheck` in {spent:.0f} s (budget {state.get('budget_s', 0):.0f} s); "
              "the JSON file beside this one holds every figure.", ""]
    for name, part in state.get("parts", {}).items():
        lines.append(f"### {TITLES.get(name, name)}")
        lines.append("")
        if part.get("status") != "done":
            lines += [f"*{part.get('status')}*", ""]
        rows = part.get("rows", [])
        if rows:
            lines += SECTIONS[name](rows)
            lines.append("")
        if part.get("log_tail"):
            lines += ["```", part["log_tail"][-1200:], "```", ""]
    return "\n".join(lines).rstrip() + "\n"
