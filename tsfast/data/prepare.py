"""Tokenize a corpus into memmap-ready uint16 files: TinyStories (Hub or local) or synthetic.

    uv run python -m tsfast.data.prepare                               # TinyStories V2, Hub
    uv run python -m tsfast.data.prepare --version v1                  # original TinyStories
    uv run python -m tsfast.data.prepare --train T.txt --valid V.txt   # local copies
    uv run python -m tsfast.data.prepare --dataset synthetic           # no network needed

Input text: the Hub's TinyStories*.txt format, stories separated by `<|endoftext|>` lines
(details in tsfast.data.sources). Both splits need at least one story; `--limit N` keeps
the first N stories of each split. The synthetic corpus puts 2% of its stories in val.

Output in <out>/<name>/ (format: tsfast.data.meta): train.bin, val.bin (uint16, every
story followed by EOT 50256), counts.npy (train token frequencies), meta.json.

Safety: the new files are written as hidden temporaries in the same directory and
fsynced; only then is the old meta.json removed, the temporaries renamed over the old
files, and the new meta.json written (atomically) last. A run that fails or is killed
before that leaves the old corpus as it was; one killed during the renames leaves no
meta.json, which every reader treats as "not prepared". A rerun whose inputs, limit and
tokenizer match the existing meta.json (and whose files check out) skips the work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tsfast.clitools import quiet_exits
from tsfast.data import meta as fmt
from tsfast.data.sources import (
    HUB_FILES,
    HUB_REPO,
    PrepareError,
    SyntheticSplit,
    TextSplit,
    check_text_file,
    download_tinystories,
    tokenize_job,
)
from tsfast.data.tokenizer import (
    ENDOFTEXT,
    EOT,
    TOKENIZER_NAME,
    VOCAB_SIZE,
    TokenizerUnavailable,
    get_tokenizer,
)
from tsfast.files import (
    fsync_dir,
    missing_dirs,
    remove_empty_dirs,
    remove_stale_temporaries,
    temp_path,
)

DATASETS = ("tinystories", "synthetic")
DEFAULT_SYNTHETIC_STORIES = 40_000  # about 5M tokens: the tiny preset sees under one epoch
SYNTHETIC_VAL_FRACTION = 0.02


def _check_name(name: str | None) -> None:
    """--name is one directory inside --out: nothing that would write elsewhere."""
    if name is not None and (name in ("", ".", "..") or Path(name).name != name or "\\" in name):
        raise PrepareError(f"--name {name!r}: must be a plain directory name, created inside --out "
                           "(no '/', '\\' or '..'); use --out to choose where it goes")


def default_name(dataset: str, version: str = "v2") -> str:
    if dataset == "synthetic":
        return "synthetic"
    return "tinystories" if version == "v2" else f"tinystories_{version}"


# ----------------------------------------------------------------------------- output

class SplitWriter:
    """Appends token arrays to a hidden temporary next to the final .bin."""

    def __init__(self, final: Path, count_tokens: bool):
        self.final = final
        self.temp = temp_path(final)
        self.handle = open(self.temp, "wb")
        self.sha256 = hashlib.sha256()
        self.tokens = self.stories = 0
        self.max_token = -1
        self.counts = np.zeros(VOCAB_SIZE, dtype=np.int64) if count_tokens else None

    def write(self, ids: np.ndarray, stories: int) -> None:
        data = ids.tobytes()
        self.handle.write(data)
        self.sha256.update(data)
        self.tokens += ids.size
        self.stories += stories
        if ids.size:
            self.max_token = max(self.max_token, int(ids.max()))
            if self.counts is not None:
                self.counts += np.bincount(ids, minlength=VOCAB_SIZE)

    def finish(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def discard(self) -> None:
        self.handle.close()
        self.temp.unlink(missing_ok=True)


def _write_temp(final: Path, write) -> Path:
    temp = temp_path(final)
    with open(temp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return temp


def _ordered_results(executor: Executor | None, jobs: Iterator, in_flight: int) -> Iterator:
    """(result, progress units) in job order, keeping at most `in_flight` jobs queued."""
    if executor is None:
        for job, units in jobs:
            yield tokenize_job(job), units
        return
    pending: deque = deque()
    for job, units in jobs:
        pending.append((executor.submit(tokenize_job, job), units))
        if len(pending) >= in_flight:
            future, done_units = pending.popleft()
            yield future.result(), done_units
    while pending:
        future, done_units = pending.popleft()
        yield future.result(), done_units


# ----------------------------------------------------------------------------- prepare

def _fingerprint(dataset: str, sources: dict, limit: int | None) -> tuple[dict, str]:
    identity = {"format": fmt.FORMAT, "tokenizer": TOKENIZER_NAME, "dataset": dataset,
                "limit": limit, "inputs": {split: src.identity() for split, src in sources.items()}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return identity, digest


def _already_prepared(out: Path, fingerprint: str) -> bool:
    if not (out / fmt.META_FILE).exists():
        return False
    try:
        existing = fmt.validate(out, check_sha256=True)
        fmt.load_counts(out)
    except fmt.DataError as exc:
        print(f"prepare: the existing data is not usable ({exc}); preparing it again", flush=True)
        return False
    if existing.get("fingerprint") != fingerprint:
        print(f"prepare: {out} was prepared from other inputs or options; preparing it again", flush=True)
        return False
    return True


def _tokenize_splits(out: Path, sources: dict, limit: int | None, workers: int,
                     progress: bool) -> dict[str, SplitWriter]:
    """Write every split to temporaries; on any failure remove them and re-raise."""
    writers: dict[str, SplitWriter] = {}
    executor = None
    if workers > 1:
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for split in ("val", "train"):  # val first: it is small, so bad input shows early
            source = sources[split]
            writers[split] = writer = SplitWriter(out / f"{split}.bin", count_tokens=split == "train")
            total, unit = source.progress_total(limit)
            with tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=f"{out.name}/{split}",
                      disable=not progress, file=sys.stderr) as bar:
                for (ids, stories), units in _ordered_results(executor, source.jobs(limit), 2 * workers):
                    writer.write(ids, stories)
                    bar.update(units)
            if writer.stories == 0:
                where = getattr(source, "path", "the synthetic generator")
                raise PrepareError(
                    f"{where}: no stories for the {split} split (empty, or only `{ENDOFTEXT}` "
                    "markers); each split needs at least one story: pass a file with stories "
                    "separated by <|endoftext|> lines"
                )
            writer.finish()
        return writers
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def _commit(out: Path, writers: dict[str, SplitWriter], meta: dict) -> None:
    """Swap the finished temporaries in; meta.json goes last (see the module docstring)."""
    temps = [_write_temp(out / fmt.COUNTS_FILE, lambda h: np.save(h, writers["train"].counts))]
    try:
        temps.append(_write_temp(out / fmt.META_FILE, lambda h: h.write(json.dumps(meta, indent=2).encode())))
    except BaseException:
        temps[0].unlink(missing_ok=True)
        raise
    (out / fmt.META_FILE).unlink(missing_ok=True)  # from here on the old corpus is not trusted
    fsync_dir(out)
    for writer in writers.values():
        os.replace(writer.temp, writer.final)
    os.replace(temps[0], out / fmt.COUNTS_FILE)
    os.replace(temps[1], out / fmt.META_FILE)
    fsync_dir(out)


def prepare(dataset: str = "synthetic", out_dir: str | Path = "data", *, version: str = "v2",
            train_file: str | Path | None = None, valid_file: str | Path | None = None,
            limit: int | None = None, num_stories: int = DEFAULT_SYNTHETIC_STORIES,
            seed: int = 0, workers: int | None = None, name: str | None = None,
            force: bool = False, progress: bool = True) -> Path:
    """Prepare a corpus in out_dir/<name>/ and return that directory (see the module doc)."""
    started = time.perf_counter()
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if version not in HUB_FILES:
        raise PrepareError(f"unknown TinyStories version {version!r}: choose v2 or v1")
    if limit is not None and limit < 1:
        raise PrepareError(f"--limit {limit}: must be at least 1 (stories kept per split); "
                           "leave it out to keep every story")
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise PrepareError(f"--workers {workers}: must be at least 1")
    if (train_file is None) != (valid_file is None):
        raise PrepareError("--train and --valid go together: pass both files (one per split), "
                           "or neither to download TinyStories from the Hub")
    _check_name(name)

    if dataset == "synthetic":
        if train_file is not None:
            raise PrepareError("--train/--valid are for --dataset tinystories; "
                               "the synthetic corpus is generated, not read")
        if num_stories < 2:
            raise PrepareError(f"--num-stories {num_stories}: the synthetic corpus needs at "
                               "least 2 stories (one for train, one for val)")
        val_stories = max(1, round(num_stories * SYNTHETIC_VAL_FRACTION))
        train_stories = num_stories - val_stories
        sources = {"train": SyntheticSplit(seed, 0, train_stories),
                   "val": SyntheticSplit(seed, train_stories, val_stories)}
        origin = {"kind": "synthetic", "seed": seed, "num_stories": num_stories}
    elif train_file is not None:
        sources = {"train": TextSplit(check_text_file(Path(train_file), "--train")),
                   "val": TextSplit(check_text_file(Path(valid_file), "--valid"))}
        origin = {"kind": "files", "version": version}
    else:
        sources = {split: TextSplit(path) for split, path in download_tinystories(version).items()}
        origin = {"kind": "hub", "repo": HUB_REPO, "version": version, "files": HUB_FILES[version]}
    get_tokenizer()  # fail here, not in a worker, if the tokenizer cannot load

    out = Path(out_dir) / (name or default_name(dataset, version))
    identity, fingerprint = _fingerprint(dataset, sources, limit)
    if not force and _already_prepared(out, fingerprint):
        print(f"prepare: {out} is already prepared from the same inputs; skipping "
              "(pass --force to redo it)", flush=True)
        return out
    created = missing_dirs(out)  # removed again if this run fails
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create {out} ({exc.strerror}); pick another --out") from exc
    remove_stale_temporaries(out)

    try:
        writers = _tokenize_splits(out, sources, limit, workers, progress)
    except BaseException as exc:
        remove_empty_dirs(created)
        if isinstance(exc, OSError):  # disk full, read-only directory, a file vanishing mid-read
            raise PrepareError(f"preparing {out} failed ({exc}); the existing data there is unchanged; "
                               "fix the cause (space, permissions) and run again") from exc
        raise
    for split, source in sources.items():
        if isinstance(source, TextSplit):
            origin[f"{split}_path"] = str(source.path.resolve())
    train = writers["train"]
    meta = {
        "format": fmt.FORMAT, "name": out.name, "dataset": dataset, "tokenizer": TOKENIZER_NAME,
        "vocab_size": VOCAB_SIZE, "eot_token": EOT, "dtype": "uint16",
        "splits": {split: {"file": w.final.name, "tokens": w.tokens, "stories": w.stories,
                           "sha256": w.sha256.hexdigest(), "max_token": w.max_token}
                   for split, w in sorted(writers.items(), key=lambda item: item[0] != "train")},
        "counts": {"file": fmt.COUNTS_FILE, "split": "train",
                   "distinct_tokens": int(np.count_nonzero(train.counts))},
        "source": {**origin, "inputs": identity["inputs"]},
        "limit": limit, "fingerprint": fingerprint,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    try:
        _commit(out, writers, meta)
    except BaseException as exc:
        for writer in writers.values():
            writer.temp.unlink(missing_ok=True)
        remove_empty_dirs(created)
        if isinstance(exc, OSError):
            raise PrepareError(f"finishing {out} failed ({exc}); run again to prepare it") from exc
        raise
    val = writers["val"]
    print(f"prepare: wrote {out}: train {train.tokens:,} tokens ({train.stories:,} stories), "
          f"val {val.tokens:,} tokens ({val.stories:,} stories) in {meta['seconds']:.1f} s", flush=True)
    return out


def ensure_synthetic(out_dir: str | Path = "data", num_stories: int = DEFAULT_SYNTHETIC_STORIES,
                     seed: int = 0, workers: int = 1, progress: bool = True) -> Path:
    """out_dir/synthetic, prepared now unless a valid synthetic corpus is already there
    (of any size or seed: an existing one is kept, not replaced).

    One process by default: spawned workers re-import the caller's main module (train.py,
    hence torch), which cost more than they saved here (41.9 s with 2 workers against
    17.4 s with one, on 2 busy cores)."""
    out = Path(out_dir) / "synthetic"
    if (out / fmt.META_FILE).exists():
        try:
            meta = fmt.validate(out, check_sha256=True)
            fmt.load_counts(out)
            if meta.get("dataset") == "synthetic":
                return out
            print(f"prepare: {out} holds dataset {meta.get('dataset')!r}; preparing it again", flush=True)
        except fmt.DataError as exc:
            print(f"prepare: {exc}; preparing it again", flush=True)
    return prepare("synthetic", out_dir, num_stories=num_stories, seed=seed, workers=workers,
                   progress=progress)


# ----------------------------------------------------------------------------- CLI

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be at least 1")
    return value


@quiet_exits
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsfast.data.prepare",
        description="Tokenize TinyStories (Hub or local files) or the synthetic corpus into "
                    "data/<name>/{train,val}.bin + meta.json.")
    parser.add_argument("--dataset", choices=DATASETS, default="tinystories",
                        help="tinystories (Hub or --train/--valid, default) or synthetic (offline)")
    parser.add_argument("--version", choices=sorted(HUB_FILES), default=None,
                        help="TinyStories release: v2 (GPT-4 stories, default) or v1")
    parser.add_argument("--train", type=Path, metavar="FILE", help="local train text file (Hub format)")
    parser.add_argument("--valid", type=Path, metavar="FILE", help="local validation text file (Hub format)")
    parser.add_argument("--out", type=Path, default=Path("data"), metavar="DIR", help="parent directory (default data)")
    parser.add_argument("--name", help="output subdirectory (default tinystories, tinystories_v1 or synthetic)")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="keep the first N stories of each split")
    parser.add_argument("--num-stories", type=_positive_int, default=None, metavar="N",
                        help=f"synthetic: stories in all (default {DEFAULT_SYNTHETIC_STORIES})")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    parser.add_argument("--workers", type=_positive_int, default=None, metavar="W",
                        help="tokenizing processes (default: CPU count, at most 8)")
    parser.add_argument("--force", action="store_true", help="redo even if already prepared")
    parser.add_argument("--check", action="store_true",
                        help="only verify the prepared directory (sizes, token ids, checksums)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.dataset == "synthetic" and args.version is not None:
        parser.error("--version applies to --dataset tinystories only")
    if args.dataset == "tinystories" and args.num_stories is not None:
        parser.error("--num-stories applies to --dataset synthetic only")
    version = args.version or "v2"
    try:
        if args.check:
            _check_name(args.name)
            out = args.out / (args.name or default_name(args.dataset, version))
            meta = fmt.validate(out, check_sha256=True)
            fmt.load_counts(out)
            splits = ", ".join(f"{s} {meta['splits'][s]['tokens']:,} tokens" for s in fmt.SPLITS)
            print(f"prepare: {out} is valid: {splits}")
            return 0
        prepare(args.dataset, args.out, version=version, train_file=args.train,
                valid_file=args.valid, limit=args.limit,
                num_stories=args.num_stories or DEFAULT_SYNTHETIC_STORIES, seed=args.seed,
                workers=args.workers, name=args.name, force=args.force,
                progress=not args.no_progress)
    except (PrepareError, fmt.DataError, TokenizerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare: interrupted; the existing prepared data (if any) is unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
