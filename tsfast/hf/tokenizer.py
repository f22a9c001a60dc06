"""GPT-2's tokenizer files for `transformers`, rebuilt from tsfast's packaged ranks.

GPT-2's `vocab.json` (token -> id) and `merges.txt` (the merges in rank order) hold the same
information as tiktoken's ranks file: a token's merge is the pair that byte-pair encoding of
its bytes reaches with the lower-ranked merges alone. The files rebuilt here are GPT-2's own,
byte for byte: their sha256 is checked against the hashes tiktoken checks for OpenAI's
`encoder.json` and `vocab.bpe`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from tsfast.data.tokenizer import ENDOFTEXT, EOT, RANKS_FILE, load_packaged_ranks

# sha256 of GPT-2's encoder.json and vocab.bpe (tiktoken_ext.openai_public.gpt2 checks the same).
VOCAB_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_TXT_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def _byte_pair_split(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """BPE of `token` using only merges ranked below the token's own rank."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            break
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.cache
def gpt2_files() -> tuple[bytes, bytes]:
    """(vocab.json, merges.txt) of GPT-2, as bytes, checked against GPT-2's hashes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_packaged_ranks(RANKS_FILE)
    to_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    vocab = {text(t): ranks[t] for t in by_rank}
    vocab[ENDOFTEXT] = EOT
    merges = ["#version: 0.2"]
    for token in by_rank:
        if len(token) > 1:
            left, right = _byte_pair_split(token, ranks)  # exactly two parts for every GPT-2 token
            merges.append(f"{text(left)} {text(right)}")
    vocab_json = json.dumps(vocab).encode()
    merges_txt = ("\n".join(merges) + "\n").encode()
    for name, data, expected in (("vocab.json", vocab_json, VOCAB_JSON_SHA256),
                                 ("merges.txt", merges_txt, MERGES_TXT_SHA256)):
        if hashlib.sha256(data).hexdigest() != expected:
            raise RuntimeError(f"the {name} rebuilt from {RANKS_FILE} is not GPT-2's (sha256 differs)")
    return vocab_json, merges_txt


def save_gpt2_tokenizer(out: Path, model_max_length: int) -> None:
    """Write GPT-2's tokenizer (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json)
    so that `AutoTokenizer.from_pretrained(out)` loads it."""
    from transformers import GPT2TokenizerFast

    vocab_json, merges_txt = gpt2_files()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_bytes(vocab_json)
    (out / "merges.txt").write_bytes(merges_txt)
    # Read back the way any transformers release reads GPT-2's files; saving adds tokenizer.json.
    tok = GPT2TokenizerFast.from_pretrained(str(out), model_max_length=model_max_length)
    tok.save_pretrained(str(out))
    # from_pretrained's own loading flags end up in the saved config; they describe this
    # machine, not the tokenizer.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
