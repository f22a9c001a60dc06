"""Where stories come from for prepare: text files in the Hub's format, the Hub itself, or
the synthetic generator; and the worker that turns a batch of stories into token ids.

Text format (the Hub's TinyStories*.txt): UTF-8, stories separated by the marker
`<|endoftext|>` (in the Hub files, a line of its own after each story). Each story is
stripped of surrounding whitespace and empty pieces between markers are dropped; a BOM at
the start is ignored; line endings inside a story are kept as they are.

A source yields jobs: small picklable tuples, ("text", [story, ...]) or
("synthetic", (seed, start, count)), so the worker processes receive either a batch of
text or just the recipe for generating it.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsfast.data.meta import DTYPE
from tsfast.data.synthetic import GENERATOR_VERSION, generate_stories
from tsfast.data.tokenizer import ENDOFTEXT, EOT, get_tokenizer

HUB_REPO = "roneneldan/TinyStories"
HUB_FILES = {
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"},
    "v1": {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"},
}
READ_CHUNK_BYTES = 1 << 22
JOB_TEXT_CHARS = 1 << 20  # about 1 MiB of text per tokenizing job
JOB_SYNTHETIC_STORIES = 1000
MAX_STORY_CHARS = 1 << 24  # TinyStories' longest story has ~4,400; more means no markers


class PrepareError(Exception):
    """Bad input to prepare; the message names the file, the problem and the fix."""


def check_text_file(path: Path, flag: str) -> Path:
    """Fail early, naming the file and the fix, unless path is a readable regular file."""
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"{flag} {path}: no such file; check the path "
                           "(or leave out --train/--valid to download TinyStories from the Hub)")
    if not path.is_file():
        raise PrepareError(f"{flag} {path}: not a regular file; pass the .txt file itself")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise PrepareError(f"{flag} {path}: cannot be read ({exc.strerror}); check its permissions") from exc
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(READ_CHUNK_BYTES):
                digest.update(block)
    except OSError as exc:
        raise PrepareError(f"{path}: read failed ({exc.strerror}); check the file") from exc
    return digest.hexdigest()


def download_tinystories(version: str = "v2") -> dict[str, Path]:
    """The Hub's TinyStories text files for `version` (cached and resumed by huggingface_hub)."""
    from huggingface_hub import hf_hub_download  # imported here: slow, and only needed online

    paths = {}
    for split, filename in HUB_FILES[version].items():
        print(f"prepare: fetching {filename} from the Hugging Face Hub ({HUB_REPO}) ...", flush=True)
        try:
            paths[split] = Path(hf_hub_download(repo_id=HUB_REPO, filename=filename, repo_type="dataset"))
        except Exception as exc:  # network, auth and cache errors all end the same way
            raise PrepareError(
                f"could not download {filename} from the Hub dataset {HUB_REPO} "
                f"({type(exc).__name__}: {exc}); check the network (HF_ENDPOINT, HF_TOKEN), "
                "or download the files yourself and pass --train FILE --valid FILE, "
                "or use --dataset synthetic"
            ) from exc
    return paths


@dataclass(frozen=True)
class TextSplit:
    """One split read from a text file in the Hub's format."""

    path: Path

    def identity(self) -> dict:
        return {"sha256": sha256_file(self.path), "bytes": self.path.stat().st_size}

    def progress_total(self, limit: int | None) -> tuple[int | None, str]:
        return (None if limit else self.path.stat().st_size), "B"

    def jobs(self, limit: int | None) -> Iterator[tuple[tuple, int]]:
        """(job, progress units) pairs: batches of stories, with the bytes read for them."""
        # utf-8-sig drops a leading BOM even when the first reads end inside it.
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
        buffer, batch, batch_chars, unreported, kept, offset = "", [], 0, 0, 0, 0
        with open(self.path, "rb") as handle:
            while True:
                raw = handle.read(READ_CHUNK_BYTES)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as exc:
                    raise PrepareError(
                        f"{self.path}: not UTF-8 text (bad byte near offset {offset + exc.start}); "
                        "pass the plain-text TinyStories file, or re-encode it as UTF-8"
                    ) from exc
                offset += len(raw)
                unreported += len(raw)
                buffer += text
                pieces = buffer.split(ENDOFTEXT)
                buffer = pieces.pop() if raw else ""
                if len(buffer) > MAX_STORY_CHARS:
                    raise PrepareError(
                        f"{self.path}: over {MAX_STORY_CHARS:,} characters without a "
                        f"`{ENDOFTEXT}` marker; pass a text file in the TinyStories format "
                        "(stories separated by <|endoftext|> lines)"
                    )
                for piece in pieces:
                    story = piece.strip()
                    if not story:
                        continue
                    batch.append(story)
                    batch_chars += len(story)
                    kept += 1
                    if kept == limit or batch_chars >= JOB_TEXT_CHARS:
                        yield ("text", batch), unreported
                        batch, batch_chars, unreported = [], 0, 0
                    if kept == limit:
                        return
                if not raw:
                    break
        if batch or unreported:
            yield ("text", batch), unreported


@dataclass(frozen=True)
class SyntheticSplit:
    """Stories start .. start+count-1 of the synthetic generator for `seed`."""

    seed: int
    start: int
    count: int

    def identity(self) -> dict:
        return {"generator": "tsfast.data.synthetic", "version": GENERATOR_VERSION,
                "seed": self.seed, "start": self.start, "count": self.count}

    def progress_total(self, limit: int | None) -> tuple[int | None, str]:
        return min(self.count, limit or self.count), "story"

    def jobs(self, limit: int | None) -> Iterator[tuple[tuple, int]]:
        count = min(self.count, limit or self.count)
        for offset in range(0, count, JOB_SYNTHETIC_STORIES):
            n = min(JOB_SYNTHETIC_STORIES, count - offset)
            yield ("synthetic", (self.seed, self.start + offset, n)), n


def tokenize_job(job: tuple) -> tuple[np.ndarray, int]:
    """Worker: (token ids with EOT after each story, number of stories) for one job."""
    kind, payload = job
    if kind == "synthetic":
        seed, start, count = payload
        stories = generate_stories(count, seed=seed, start=start)
    else:
        stories = payload
    encoding = get_tokenizer()
    ids: list[int] = []
    for story in stories:
        ids += encoding.encode_ordinary(story)
        ids.append(EOT)
    return np.array(ids, dtype=DTYPE), len(stories)
