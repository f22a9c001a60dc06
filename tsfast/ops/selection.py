"""Measured selection under `--kernels auto` on CUDA: never slower than PyTorch on this GPU.

Each op module lists its candidates (a `Family`): the Triton path(s) and the best plain-
PyTorch way, all meeting the op's contract. Under "auto" on a CUDA device, the first call of
an op with a new key (op, shape bucket, dtype, autocast dtype, whether gradients are wanted,
device type) times every candidate that can take it, forward + backward together (forward
alone when no gradient is wanted), on fresh random inputs of the call's shape, with
`triton.testing.do_bench`, and runs the fastest from then on:

- The choice is fixed for the life of the process: a key is measured at most once.
- The choices live in memory and on disk, one JSON file per GPU model under the cache
  directory ($TSFAST_CACHE_DIR, else $XDG_CACHE_HOME/tsfast, else ~/.cache/tsfast), stamped
  with the torch and Triton versions. A file made under other versions (stale) or that
  cannot be read (corrupt) is ignored with one log line and rewritten; never a crash.
- A candidate that fails while being timed (out of memory, an error) is left out with its
  reason; if every candidate fails, the first one (the default) runs.
- Shape bucket: the dims a model varies (rows, batch, sequence length) are rounded up to a
  power of two, so decoding and ragged batches measure a handful of times, not every call.

`--kernels triton` / `torch` force the first candidate of that backend and measure nothing.
How this meets torch.compile, and the DDP broadcast: docs/design.md, "Measured selection".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("tsfast.ops")

FORMAT = 1  # of the cache file; another value is a stale file
BENCH_WARMUP_MS, BENCH_REP_MS = 10, 40  # do_bench budget per candidate


@dataclass(frozen=True)
class Candidate:
    """One way to run an op. `impl` takes the op path's argument tuple. `fits(call,
    free_bytes)` says why the candidate cannot run this call with `free_bytes` of device
    memory free (None: it fits); asked only when measuring, so it may read the device."""

    name: str
    backend: str  # "triton" or "torch": what --kernels forces
    impl: Callable
    fits: Callable | None = None


class Family:
    """An op's candidates, in order of preference (the first of a backend is its default),
    and how to build random inputs to time them.

    A call is described by a tuple of python constants named by `fields` (shapes, flags,
    dtype names, and last `grad`: whether gradients are wanted); `bucketed` names the
    fields rounded up to a power of two for the cache key. `bench_inputs(call, device)`
    returns (args for impl, the tensors to differentiate with respect to)."""

    def __init__(self, op: str, candidates: tuple[Candidate, ...], *, fields: tuple[str, ...],
                 bucketed: tuple[str, ...], bench_inputs: Callable):
        self.op = op
        self.candidates = candidates
        self.fields = fields
        self.bucketed = bucketed
        self.bench_inputs = bench_inputs
        self._by_name = {c.name: c for c in candidates}

    def candidate(self, name: str) -> Candidate:
        return self._by_name[name]

    def default(self, backend: str) -> Candidate:
        return next(c for c in self.candidates if c.backend == backend)

    def describe(self, call: tuple) -> str:
        return " ".join(f"{n}={v}" for n, v in zip(self.fields, call, strict=True) if n != "grad")

    def key(self, call: tuple, device_type: str, autocast: str | None, allowed: tuple[str, ...]) -> str:
        """The cache key: the call with its bucketed fields rounded up, and what was timed."""
        bucket = tuple(_pow2(v) if n in self.bucketed else v for n, v in zip(self.fields, call, strict=True))
        return (f"{self.op} {self.describe(bucket)} autocast={autocast} {_mode(call)} {device_type} "
                f"among {','.join(allowed)}")


def _usable(record, allowed: tuple[str, ...]) -> bool:
    """A cache entry that has what the table reads and a choice among today's candidates."""
    return (isinstance(record, dict) and record.get("chosen") in allowed and record.get("candidates") == list(allowed)
            and isinstance(record.get("ms"), dict) and isinstance(record.get("backends"), list)
            and len(record["backends"]) == len(allowed) and isinstance(record.get("shape"), str))


def _mode(call: tuple) -> str:
    return "fwd+bwd" if call[-1] else "fwd"


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def do_bench_ms(fn) -> float:
    """Median ms of fn() by triton.testing.do_bench (L2 flushed between calls)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))


def default_cache_dir() -> Path:
    if os.environ.get("TSFAST_CACHE_DIR"):
        return Path(os.environ["TSFAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tsfast"


def environment(device: torch.device) -> dict:
    """What a measurement depends on besides the call: the GPU model and the versions."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version}


def _step(impl, args, wrt, autocast: str | None, device_type: str):
    """One forward (+ backward with respect to `wrt`) of impl, as a zero-argument callable."""
    dtype = getattr(torch, autocast) if autocast else None
    grad_out = []

    def run():
        with torch.set_grad_enabled(bool(wrt)):
            with torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext():
                out = impl(*args)
            if wrt:
                if not grad_out:
                    grad_out.append(torch.ones_like(out))
                torch.autograd.grad(out, wrt, grad_out[0])

    return run


class Selector:
    """Makes and remembers the choices of one process.

    timer(fn) -> ms times a zero-argument callable (default: do_bench). cache_dir: where the
    on-disk cache lives (default: default_cache_dir(); None: memory only). measure=False:
    a key not yet chosen takes the default candidate instead of being timed (DDP ranks
    other than 0, which install rank 0's choices instead)."""

    def __init__(self, *, timer: Callable | None = None, cache_dir: Path | str | None | bool = True,
                 measure: bool = True):
        self.timer = timer or do_bench_ms
        self.cache_dir = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
        self.measure = measure
        self._choices: dict[str, dict] = {}  # key -> record, in the order made
        self._seen: dict[tuple, str] = {}  # exact call -> chosen name
        self._files: dict[Path, dict] = {}  # cache file -> its usable entries
        self._write_failed = False

    # ------------------------------------------------------------------ choosing

    def pick(self, family: Family, device: torch.device, call: tuple, allowed: tuple[str, ...],
             autocast: str | None) -> str:
        """The name of the candidate (one of `allowed`) that runs calls with this key."""
        fast = (family.op, call, device.type, autocast, allowed)
        if fast in self._seen:  # every call after the first: one dict lookup
            return self._seen[fast]
        key = family.key(call, device.type, autocast, allowed)
        if key in self._choices:
            self._seen[fast] = self._choices[key]["chosen"]
            return self._seen[fast]
        path = self._cache_file(device)
        cached = self._file_entries(path, device).get(key) if path else None
        if _usable(cached, allowed):
            record = {**cached, "source": "cache"}
        elif self.measure:
            record = self._measure(family, device, call, allowed, autocast)
            if path:
                self._save(path, device, key, record)
        else:
            record = self._record(family, call, allowed, {}, {}, allowed[0], "default")
            log.warning("tsfast: %s was not chosen on rank 0; this process runs %s for it", key, allowed[0])
        self._choices[key] = {**record, "key": key}
        self._seen[fast] = record["chosen"]
        return record["chosen"]

    def _record(self, family, call, allowed, ms, skipped, chosen, source) -> dict:
        return {"op": family.op, "shape": family.describe(call), "mode": _mode(call), "candidates": list(allowed),
                "backends": [family.candidate(n).backend for n in allowed],
                "ms": ms, "skipped": skipped, "chosen": chosen, "source": source}

    def _measure(self, family: Family, device: torch.device, call: tuple, allowed, autocast) -> dict:
        try:
            args, wrt = family.bench_inputs(call, device)
        except Exception as e:  # even the inputs do not fit: run the default, say why
            log.warning("tsfast: cannot time %s (%s: %s); it runs %s", family.op, type(e).__name__, e, allowed[0])
            return self._record(family, call, allowed, {}, {}, allowed[0], "default (inputs failed)")
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        ms, skipped = {}, {}
        for name in allowed:
            cand = family.candidate(name)
            why = cand.fits(call, free) if cand.fits else None
            if why:
                skipped[name] = why
                continue
            try:
                ms[name] = float(self.timer(_step(cand.impl, args, wrt, autocast, device.type)))
            except torch.OutOfMemoryError:
                skipped[name] = "out of memory"
            except Exception as e:  # a candidate that cannot run here is left out, never a crash
                skipped[name] = f"{type(e).__name__}: {e}"[:300]
                log.warning("tsfast: timing %s for %s failed (%s); it is left out",
                            name, family.op, skipped[name])
            if name in skipped and device.type == "cuda":
                torch.cuda.empty_cache()
        chosen = min(ms, key=ms.get) if ms else allowed[0]  # ties: the earlier candidate
        return self._record(family, call, allowed, ms, skipped, chosen, "measured")

    # ------------------------------------------------------------------ the run's choices

    def records(self) -> list[dict]:
        """Every choice made (or installed) in this process, in order."""
        return [dict(r) for r in self._choices.values()]

    def install(self, records: list[dict]) -> None:
        """Take choices made elsewhere (rank 0) as this process' own."""
        for r in records:
            self._choices[r["key"]] = {**r, "source": "rank 0"}

    # ------------------------------------------------------------------ the cache file

    def _cache_file(self, device: torch.device) -> Path | None:
        if self.cache_dir is None:
            return None
        gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", environment(device)["gpu"]).strip("_") or "device"
        return self.cache_dir / f"kernel-choices-{gpu}.json"

    def _file_entries(self, path: Path, device: torch.device) -> dict:
        if path in self._files:
            return self._files[path]
        entries: dict = {}
        env = environment(device)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
                raise ValueError("not a kernel-choice cache")
            if data.get("format") != FORMAT or data.get("env") != env:
                log.warning("tsfast: ignoring stale kernel-choice cache %s (made for %s, format %s; "
                            "this is %s): measuring again", path, data.get("env"), data.get("format"), env)
            else:
                entries = {k: v for k, v in data["choices"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("tsfast: ignoring unreadable kernel-choice cache %s (%s: %s): measuring again",
                        path, type(e).__name__, e)
        self._files[path] = entries
        return entries

    def _save(self, path: Path, device: torch.device, key: str, record: dict) -> None:
        entries = self._files.setdefault(path, {})
        entries[key] = record
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": FORMAT, "env": environment(device), "choices": entries},
                                      indent=1), encoding="utf-8")
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        except OSError as e:
            if not self._write_failed:
                self._write_failed = True
                log.warning("tsfast: cannot write the kernel-choice cache %s (%s); choices stay in "
                            "memory for this run", path, e)


# ----------------------------------------------------------------------------- the process' selector

_current: Selector | None = None


def current() -> Selector:
    """This process' selector (made on first use: nothing runs at import)."""
    global _current
    if _current is None:
        _current = Selector()
    return _current


def set_current(selector: Selector) -> None:
    global _current
    _current = selector


# ----------------------------------------------------------------------------- the table


def speedup(record: dict) -> float | None:
    """How much faster the chosen candidate is than the fastest plain-PyTorch one."""
    ms = record.get("ms") or {}
    torch_ms = [ms[n] for n, b in zip(record["candidates"], record["backends"], strict=True)
                if b == "torch" and n in ms]
    chosen = ms.get(record["chosen"])
    return min(torch_ms) / chosen if torch_ms and chosen else None


def format_table(records: list[dict]) -> list[str]:
    """The choices as aligned text lines: op, shape, chosen, ms of each candidate, speedup."""
    if not records:
        return []
    names = list(dict.fromkeys(n for r in records for n in r["candidates"]))
    header = f"{'op':<21} {'shape':<44} {'chosen':<11}" + "".join(f" {n + ' ms':>14}" for n in names)
    lines = [header + f" {'speedup':>8}  how"]
    for r in records:
        ms, skipped = r.get("ms", {}), r.get("skipped", {})
        cells = "".join(f" {ms[n]:>14.3f}" if n in ms else f" {'skipped' if n in skipped else '-':>14}" for n in names)
        s = speedup(r)
        lines.append(f"{r['op']:<21} {r['shape'][:44]:<44} {r['chosen']:<11}{cells}"
                     f" {(f'{s:.2f}x' if s else '-'):>8}  {r['mode']}, {r['source']}")
    return lines
