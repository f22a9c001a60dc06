"""The prepared-data format, and its validation (shared by prepare and the loader).

A prepared corpus is a directory `data/<name>/` holding:

    train.bin, val.bin  token ids as little-endian uint16, no header; every story is
                        followed by the end-of-text token 50256
    counts.npy          int64 array (50257,): how often each token id occurs in train.bin
                        (the compact vocabulary is built from it)
    meta.json           written last, so a directory without it is never trusted:
        format          "tsfast-tokens-v1"
        name, dataset   e.g. "tinystories" / "tinystories"; "synthetic" / "synthetic"
        tokenizer       "gpt2"; vocab_size 50257; eot_token 50256; dtype "uint16"
        splits          {"train": {...}, "val": {...}}, each {"file", "tokens", "stories",
                        "sha256" (of the .bin), "max_token"}
        counts          {"file": "counts.npy", "split": "train", "distinct_tokens"}
        source          where the text came from: Hub repo and files, local paths, or the
                        synthetic generator's seed and version; input sha256 per split
        limit           --limit (stories kept per split) or null
        fingerprint     sha256 of what determines the output (inputs, limit, tokenizer,
                        format): a rerun with the same fingerprint skips the work
        created_utc, seconds
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tsfast.data.tokenizer import EOT, TOKENIZER_NAME, VOCAB_SIZE

FORMAT = "tsfast-tokens-v1"
DTYPE = np.dtype("<u2")
SPLITS = ("train", "val")
META_FILE = "meta.json"
COUNTS_FILE = "counts.npy"
_CHUNK_TOKENS = 1 << 24  # 32 MiB of uint16 per pass when scanning a .bin

PREPARE_HINT = "uv run python -m tsfast.data.prepare"


class DataError(ValueError):
    """Prepared data that is missing, inconsistent or damaged; the message names the fix."""


def prepare_command(data_dir: Path) -> str:
    """The prepare command that (re)writes data_dir, for error messages."""
    flags = {
        "synthetic": "--dataset synthetic",
        "tinystories": "--dataset tinystories",
        "tinystories_v1": "--dataset tinystories --version v1",
    }.get(data_dir.name, f"--dataset tinystories|synthetic --name {data_dir.name}")
    out = "" if data_dir.parent == Path("data") else f" --out {data_dir.parent}"
    return f"{PREPARE_HINT} {flags}{out}"


def _redo(meta_path: Path) -> str:
    return f"prepare it again with `{prepare_command(meta_path.parent)}`"


def read_meta(data_dir: str | Path) -> dict:
    """Parse and check data_dir/meta.json (not the .bin files)."""
    meta_path = Path(data_dir) / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"{meta_path} not found: {Path(data_dir)} holds no finished prepared corpus; "
            f"{_redo(meta_path)}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path} is unreadable ({exc}); {_redo(meta_path)}") from exc
    expected = {"format": FORMAT, "tokenizer": TOKENIZER_NAME, "vocab_size": VOCAB_SIZE,
                "eot_token": EOT, "dtype": "uint16"}
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} is not a JSON object; {_redo(meta_path)}")
    for key, value in expected.items():
        if meta.get(key) != value:
            raise DataError(
                f"{meta_path}: {key} is {meta.get(key)!r}, expected {value!r}; {_redo(meta_path)}"
            )
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{meta_path}: splits is {_shown(splits)}, expected an object with "
                        f"{' and '.join(SPLITS)}; {_redo(meta_path)}")
    for split in SPLITS:
        info = splits.get(split)
        if not isinstance(info, dict):
            raise DataError(f"{meta_path}: no entry for split {split!r}; {_redo(meta_path)}")
        _check_split(info, split, meta_path)
    counts = meta.get("counts", {})
    distinct = counts.get("distinct_tokens") if isinstance(counts, dict) else None
    if not isinstance(counts, dict) or not (distinct is None or _whole(distinct, 1, VOCAB_SIZE)):
        raise DataError(f"{meta_path}: counts is {_shown(counts)}, expected an object whose "
                        f"distinct_tokens is 1..{VOCAB_SIZE}; {_redo(meta_path)}")
    return meta


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value, low: int, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def _check_split(info: dict, split: str, meta_path: Path) -> None:
    """Each field of one split's entry that the loader reads, by type and range."""
    file = info.get("file", f"{split}.bin")
    if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
        problem = f"file is {_shown(file)}, expected a file name inside {meta_path.parent}"
    elif not _whole(info.get("tokens"), 1):
        problem = (f"tokens is {_shown(info.get('tokens'))}, expected a whole number >= 1 "
                   "(an empty split cannot be trained or evaluated on)")
    elif "stories" in info and not _whole(info["stories"], 1):
        problem = f"stories is {_shown(info['stories'])}, expected a whole number >= 1"
    elif "sha256" in info and not (isinstance(info["sha256"], str) and len(info["sha256"]) == 64):
        problem = f"sha256 is {_shown(info['sha256'])}, expected 64 hex digits"
    else:
        return
    raise DataError(f"{meta_path}: split {split!r}: {problem}; {_redo(meta_path)}")


def scan_tokens(path: Path, n_tokens: int, *, sha256: bool = True) -> tuple[str | None, int]:
    """(sha256 or None, largest id) of a .bin, read in chunks."""
    digest = hashlib.sha256() if sha256 else None
    largest = -1
    tokens = np.memmap(path, dtype=DTYPE, mode="r", shape=(n_tokens,)) if n_tokens else ()
    for start in range(0, n_tokens, _CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + _CHUNK_TOKENS])
        if digest is not None:
            digest.update(chunk.tobytes())
        largest = max(largest, int(chunk.max()))
    return (digest.hexdigest() if digest else None), largest


def validate(data_dir: str | Path, *, check_tokens: bool = True, check_sha256: bool = False) -> dict:
    """Check a prepared corpus against its meta.json and return the meta.

    Always: meta fields, each .bin's size (tokens * 2 bytes). check_tokens: every id is
    below 50257 (a full read). check_sha256: the .bin checksums match (a full read too).
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    meta_path = data_dir / META_FILE
    for split in SPLITS:
        info = meta["splits"][split]
        path = data_dir / info.get("file", f"{split}.bin")
        if not path.is_file():
            raise DataError(f"{path} is missing but {meta_path} lists it; {_redo(meta_path)}")
        expected_bytes = info["tokens"] * DTYPE.itemsize
        actual_bytes = path.stat().st_size
        if actual_bytes != expected_bytes:
            raise DataError(
                f"{path} has {actual_bytes} bytes but {meta_path} says {info['tokens']} uint16 "
                f"tokens ({expected_bytes} bytes): truncated or from another run; {_redo(meta_path)}"
            )
        if not (check_tokens or check_sha256):
            continue
        digest, largest = scan_tokens(path, info["tokens"], sha256=check_sha256)
        if largest >= VOCAB_SIZE:
            raise DataError(
                f"{path} holds token id {largest}, outside GPT-2's vocabulary (ids 0..{VOCAB_SIZE - 1}): "
                f"the file is damaged or not GPT-2 tokens; {_redo(meta_path)}"
            )
        if check_sha256 and digest != info.get("sha256"):
            raise DataError(
                f"{path}: sha256 {digest} does not match {meta_path} ({info.get('sha256')}): the "
                f"file changed after it was prepared; {_redo(meta_path)}"
            )
    return meta


def load_counts(data_dir: str | Path) -> np.ndarray:
    """Train-split token frequencies (int64, shape (50257,)) of a prepared corpus, checked
    against meta.json: they add up to the train split's tokens and count its distinct ids."""
    path = Path(data_dir) / COUNTS_FILE
    meta_path = Path(data_dir) / META_FILE
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is missing or unreadable ({exc}); {_redo(meta_path)}") from exc
    if counts.shape != (VOCAB_SIZE,) or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise DataError(
            f"{path} holds {counts.dtype} {counts.shape}, expected non-negative int64 ({VOCAB_SIZE},); "
            f"{_redo(meta_path)}"
        )
    counts = counts.astype(np.int64, copy=False)
    meta = read_meta(data_dir)
    tokens = meta["splits"]["train"]["tokens"]
    distinct = meta.get("counts", {}).get("distinct_tokens")
    found = int(np.count_nonzero(counts))
    if int(counts.sum()) != tokens or (distinct is not None and found != distinct):
        raise DataError(
            f"{path} counts {int(counts.sum()):,} tokens ({found} distinct) but {meta_path} says the "
            f"train split holds {tokens:,} ({distinct} distinct): the counts are damaged or from "
            f"another run; {_redo(meta_path)}"
        )
    return counts
