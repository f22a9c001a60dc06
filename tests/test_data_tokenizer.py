"""GPT-2 tokenizer: known ids, byte-level round trips, offline loading and its errors."""

import hashlib
import importlib.util
import random
import subprocess
import sys

import pytest
import tiktoken

from tsfast.data import tokenizer
from tsfast.data.tokenizer import EOT, TokenizerUnavailable, decode, encode, get_tokenizer


def test_known_ids():
    assert encode("Once upon a time, there was a little girl named Lily.") == [
        7454, 2402, 257, 640, 11, 612, 373, 257, 1310, 2576, 3706, 20037, 13,
    ]
    assert encode("Hello world") == [15496, 995]
    assert encode("\n") == [198]
    assert EOT == 50256 and get_tokenizer().eot_token == EOT and get_tokenizer().n_vocab == 50257


def test_end_of_text_typed_in_text_is_ordinary_text():
    ids = encode("The end.<|endoftext|>")
    assert EOT not in ids
    assert decode(ids) == "The end.<|endoftext|>"
    assert decode([EOT]) == "<|endoftext|>"


@pytest.mark.parametrize("text", [
    "I love ice cream 🍦🍦 and 👩‍👩‍👧 families!",
    "日本語のテキストと中文文本",
    "Привет, как дела? Ελληνικά. العربية. हिन्दी. 한국어.",
    "tabs\tand\r\nwindows newlines   and  spaces",
])
def test_other_scripts_and_emoji_round_trip(text):
    ids = encode(text)
    assert all(0 <= i < EOT for i in ids)
    assert decode(ids) == text
    # Byte-level BPE: the tokens' bytes concatenate to the UTF-8 bytes, token by token.
    assert b"".join(get_tokenizer().decode_single_token_bytes(i) for i in ids) == text.encode()


def test_random_unicode_round_trip():
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(50):
        chars = []
        for _ in range(rng.randrange(1, 80)):
            code = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                               rng.randrange(0xE000, 0x110000), ord(rng.choice(" \n\t"))])
            chars.append(chr(code))
        text = "".join(chars)
        assert decode(encode(text)) == text, f"seed {seed}: {text!r}"


def test_decode_accepts_arrays_and_tensors():
    import numpy as np
    import torch

    ids = encode("A small cat.")
    assert decode(np.array(ids, dtype=np.uint16)) == decode(torch.tensor(ids)) == "A small cat."


def test_loads_offline_from_the_packaged_ranks():
    code = (
        "from tsfast.data.tokenizer import get_tokenizer, packaged_ranks_path;"
        "e = get_tokenizer(); print(packaged_ranks_path()); print(e.encode('Lily'))"
    )
    # An unreachable proxy proves no download is attempted on the offline path.
    env = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    path, ids = result.stdout.split("\n")[:2]
    assert path.endswith("tsfast/data/gpt2.tiktoken")
    assert ids == str(encode("Lily"))


def test_packaged_ranks_are_gpt2s_and_ship_with_their_license():
    path = tokenizer.packaged_ranks_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokenizer.RANKS_SHA256
    assert "MIT" in path.with_name("gpt2.tiktoken.LICENSE").read_text()
    # No numba/llvmlite (openai-whisper's dependencies) needed for the tokenizer any more.
    assert importlib.util.find_spec("whisper") is None


@pytest.fixture
def fresh_cache():
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def _offline(*args, **kwargs):
    raise ConnectionError("no network here")


def test_clear_error_when_no_ranks_are_available(monkeypatch, fresh_cache):
    monkeypatch.setattr(tokenizer, "packaged_ranks_path", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", _offline)
    with pytest.raises(TokenizerUnavailable, match="gpt2.tiktoken is missing.*reinstall tsfast"):
        get_tokenizer()


def test_damaged_ranks_file_is_rejected_by_checksum(monkeypatch, fresh_cache, tmp_path):
    real = tokenizer.packaged_ranks_path().read_bytes()
    damaged = tmp_path / "gpt2.tiktoken"
    damaged.write_bytes(real[:-40])  # one rank line lost
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() != tokenizer.RANKS_SHA256
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's cache must not answer for the file
    monkeypatch.setattr(tokenizer, "packaged_ranks_path", lambda: damaged)
    monkeypatch.setattr(tiktoken, "get_encoding", _offline)
    with pytest.raises(TokenizerUnavailable, match=f"{damaged}: not GPT-2's ranks file.*damaged.*reinstall"):
        get_tokenizer()


def test_falls_back_to_tiktoken_when_the_packaged_file_is_missing(monkeypatch, fresh_cache):
    sentinel = object()
    monkeypatch.setattr(tokenizer, "packaged_ranks_path", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: sentinel if name == "gpt2" else None)
    assert get_tokenizer() is sentinel
