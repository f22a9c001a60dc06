"""GPT-2 byte-pair encoding through tiktoken, working offline.

The ids are identical to `tiktoken.get_encoding("gpt2")`: 50256 merge ranks plus the one
special token `<|endoftext|>` = 50256, split by GPT-2's regex (tiktoken's r50k pattern).

Where the ranks come from, in order:
1. `tsfast/data/gpt2.tiktoken`, shipped inside tsfast (835 kB; its origin and license are in
   `gpt2.tiktoken.LICENSE` beside it). tiktoken's own loader reads it and checks its sha256.
   This is the path that works on a machine with no network.
2. tiktoken's download (`tiktoken.get_encoding("gpt2")`, cached after the first time); used
   only when the packaged file is missing or damaged.
Neither: a `TokenizerUnavailable` error that says how to fix it.

`encode` treats its input as plain text: a literal "<|endoftext|>" typed in a story is
encoded as ordinary characters (several tokens), never as the special token. Only the data
pipeline appends the real end-of-text token EOT between stories.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

EOT = 50256  # <|endoftext|>, the one special token; also GPT-2's last id
VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"
TOKENIZER_NAME = "gpt2"

RANKS_FILE = Path(__file__).with_name("gpt2.tiktoken")
# The same file tiktoken downloads as r50k_base.tiktoken, with the same sha256.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
REINSTALL = "reinstall tsfast (`uv sync --reinstall-package tinystories-fast`)"


class TokenizerUnavailable(RuntimeError):
    """Neither the packaged GPT-2 ranks nor tiktoken's download could be loaded."""


def packaged_ranks_path() -> Path | None:
    """Path of the gpt2.tiktoken that ships with tsfast, or None if it is missing."""
    return RANKS_FILE if RANKS_FILE.is_file() else None


def load_packaged_ranks(path: Path) -> dict[bytes, int]:
    """GPT-2's merge ranks from `path`, parsed by tiktoken's own loader."""
    try:
        # Checked here too: tiktoken skips its own check when its cache is off
        # (TIKTOKEN_CACHE_DIR=""), and answers from its cache when that holds a good copy.
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != RANKS_SHA256:
            raise ValueError(f"its sha256 is {digest}")
        return load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256)
    except (OSError, ValueError) as exc:
        raise TokenizerUnavailable(
            f"{path}: not GPT-2's ranks file ({exc}; expected sha256 {RANKS_SHA256}): "
            f"the file is damaged: {REINSTALL}"
        ) from exc


def _encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    # tiktoken's own definition of GPT-2's split regex, so both loading paths agree.
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (loaded once per process)."""
    problems = []
    path = packaged_ranks_path()
    if path is None:
        problems.append(f"{RANKS_FILE} is missing")
    else:
        try:
            return _encoding(load_packaged_ranks(path))
        except TokenizerUnavailable as exc:
            problems.append(str(exc))
    try:
        return tiktoken.get_encoding(TOKENIZER_NAME)
    except Exception as exc:  # tiktoken raises requests/OS/Value errors when offline
        problems.append(f"tiktoken could not download the gpt2 ranks ({type(exc).__name__}: {exc})")
    raise TokenizerUnavailable(
        "cannot load the GPT-2 tokenizer: "
        + "; ".join(problems)
        + f". Fix: {REINSTALL}, or connect to the network once so tiktoken can download and "
        "cache the ranks."
    )


def encode(text: str) -> list[int]:
    """Token ids of plain text; a literal "<|endoftext|>" in it is ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids: Iterable[int]) -> str:
    """Text of token ids (numpy arrays and tensors welcome); bad UTF-8 becomes U+FFFD."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))
