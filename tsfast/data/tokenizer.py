"""GPT-2 byte-pair encoding through tiktoken, working offline.

The ids are identical to `tiktoken.get_encoding("gpt2")`: 50256 merge ranks plus the one
special token `<|endoftext|>` = 50256, split by GPT-2's regex (tiktoken's r50k pattern).

Where the ranks come from, in order:
1. `whisper/assets/gpt2.tiktoken`, shipped inside the `openai-whisper` package (a project
   dependency). It is found with `importlib.util.find_spec` without importing whisper (that
   import pulls in torch and numba and is slow), and its sha256 is checked. This is the path
   that works on a machine with no network.
2. tiktoken's own loader (`tiktoken.get_encoding("gpt2")`), which downloads the ranks once
   and caches them; used only when the packaged file is missing or damaged.
Neither: a `TokenizerUnavailable` error that says how to fix it.

`encode` treats its input as plain text: a literal "<|endoftext|>" typed in a story is
encoded as ordinary characters (several tokens), never as the special token. Only the data
pipeline appends the real end-of-text token EOT between stories.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import tiktoken

EOT = 50256  # <|endoftext|>, the one special token; also GPT-2's last id
VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"
TOKENIZER_NAME = "gpt2"

RANKS_FILE_IN_WHISPER = ("assets", "gpt2.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class TokenizerUnavailable(RuntimeError):
    """Neither the packaged GPT-2 ranks nor tiktoken's download could be loaded."""


def packaged_ranks_path() -> Path | None:
    """Path of gpt2.tiktoken inside the installed openai-whisper package, or None."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*RANKS_FILE_IN_WHISPER)
        if candidate.is_file():
            return candidate
    return None


def _parse_ranks(data: bytes, source: Path) -> dict[bytes, int]:
    """Parse the tiktoken ranks format: one `base64(token_bytes) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise TokenizerUnavailable(
                f"{source}: line {line_number} is not 'base64 rank' ({exc}); "
                "reinstall the package with `uv sync --reinstall-package openai-whisper`"
            ) from exc
    return ranks


def _load_packaged(path: Path) -> tiktoken.Encoding:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise TokenizerUnavailable(
            f"{path}: sha256 is {digest}, expected {RANKS_SHA256} (damaged or a different "
            "file); reinstall it with `uv sync --reinstall-package openai-whisper`"
        )
    # tiktoken's own definition of GPT-2's split regex, so both loading paths agree.
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=_parse_ranks(data, path),
        special_tokens={ENDOFTEXT: EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (loaded once per process)."""
    problems = []
    path = packaged_ranks_path()
    if path is None:
        problems.append("the openai-whisper package (which ships gpt2.tiktoken) is not installed")
    else:
        try:
            return _load_packaged(path)
        except (OSError, TokenizerUnavailable) as exc:
            problems.append(str(exc))
    try:
        return tiktoken.get_encoding(TOKENIZER_NAME)
    except Exception as exc:  # tiktoken raises requests/OS/Value errors when offline
        problems.append(f"tiktoken could not download the gpt2 ranks ({type(exc).__name__}: {exc})")
    raise TokenizerUnavailable(
        "cannot load the GPT-2 tokenizer: "
        + "; ".join(problems)
        + ". Fix: run `uv sync` (installs openai-whisper, which carries the ranks offline), "
        "or `pip install openai-whisper`, or connect to the network once so tiktoken can "
        "download and cache them."
    )


def encode(text: str) -> list[int]:
    """Token ids of plain text; a literal "<|endoftext|>" in it is ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids: Iterable[int]) -> str:
    """Text of token ids (numpy arrays and tensors welcome); bad UTF-8 becomes U+FFFD."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))
