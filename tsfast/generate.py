"""Autoregressive sampling with a KV cache, shared by `sample.py` and `demo.py`.

    ids = generate(model, prompt_ids, max_new_tokens=200, temperature=0.8, top_k=200, seed=1)
    for piece in stream_text(model, "Once upon a time", max_new_tokens=200, vocab=vocab):
        print(piece, end="", flush=True)

How one sequence is decoded (`Decoder`):
- The prompt is run once (prefill) into a `KVCache`; every later step feeds only the newest
  token. Rotary positions continue from the cache length (the model reads `kv_cache.length`).
- The context window: the model sees `tokens[start:]`, at most `block_size` tokens. When a
  new token would overflow it, the window hops forward: it keeps the newest
  `block_size - block_size // 4` tokens and re-runs them (a fresh prefill), then goes on one
  token per step. Re-running is what keeps the cache exact: the keys and values of layers
  above the first depend on every token a position attended to, so dropping the oldest
  cache entries (rotary) would leave keys that still carry the dropped tokens, and the
  logits would drift from what the model computes on the window itself. Hopping by a
  quarter window costs one prefill every `block_size // 4` tokens and works the same for
  rotary and learned positions. A prompt longer than the context is cut the same way
  (its oldest tokens are dropped; `Decoder.truncated` says how many).
- `use_cache=False` re-runs the whole current window for every token: the same windows,
  so the same logits (within float rounding); the tests and the benchmark compare the two.

Sampling: logits in float32, divided by the temperature (0 = greedy; so is a temperature
below float32's smallest normal number, 1.2e-38), top-k (0/None off),
top-p (nucleus; 1.0/None off), then one draw from a `torch.Generator` seeded by `seed`, so
samples reproduce and the global RNG is left alone. Generation stops at the end-of-text
token (not returned) or after `max_new_tokens`.

Several sequences at once (sample.py's samples, the demo's users): `tsfast.batching`, whose
docstring gives the batched cache's layout; a sequence there is sampled with the same
arithmetic (`sample_rows`), so a seed gives the same story alone or batched, up to the float
rounding of the logits.

Compact vocabularies: with `vocab` (a `tsfast.data.vocab.CompactVocab`), prompt ids are
GPT-2 ids mapped to the model's compact ids (unknown ones to its unk id), sampled ids are
mapped back to GPT-2 ids, and the end-of-text token is `vocab.eot_id`. Every id a public
function takes or returns is a GPT-2 id.

Text: `IncrementalDetokenizer` turns ids into text piece by piece, holding back the bytes of
a character that a token ends in the middle of (GPT-2's byte-level BPE splits emoji and
many CJK characters across tokens), so the pieces join to exactly `decode(ids)`.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence

import torch

from tsfast.data.tokenizer import EOT, encode, get_tokenizer
from tsfast.model import GPT, KVCache

__all__ = [
    "Decoder",
    "IncrementalDetokenizer",
    "check_sampling",
    "generate",
    "iter_tokens",
    "prompt_fit",
    "window_keep",
    "window_start",
    "sample_next",
    "sample_rows",
    "stream_text",
]


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the first bad sampling setting and its valid range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, int | float) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id drawn from `logits` (V,): temperature (0 = argmax), top-k, then top-p."""
    return sample_rows(logits[None], [(temperature, top_k, top_p)], [generator])[0]


def sample_rows(logits: torch.Tensor, settings: Sequence[tuple[float, int | None, float | None]],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """`sample_next` for every row of `logits` (B, V), each with its own (temperature, top_k,
    top_p) and generator; one argmax or top-k for the rows that share a temperature and k
    (a top-k over the vocabulary is most of a row's sampling time). Row by row, the same
    arithmetic as one row alone, so the same draws."""
    logits = logits.float()
    V = logits.shape[-1]
    groups: dict[tuple[float, int | None], list[int]] = {}
    for i, (temperature, top_k, _) in enumerate(settings):
        groups.setdefault((temperature, top_k if top_k and top_k < V else None), []).append(i)
    out = [0] * len(settings)
    for (temperature, top_k), rows in groups.items():
        group = logits if len(rows) == len(settings) else logits[rows]  # one group: no copy
        if temperature < torch.finfo(torch.float32).tiny:  # 0, or below float32's normal range
            for i, token in zip(rows, group.argmax(dim=-1).tolist(), strict=True):
                out[i] = token
            continue
        # Shift the largest logit to 0 first: a tiny temperature then sends the others to -inf
        # instead of overflowing to inf (inf - inf is NaN in the softmax). With top-k, only
        # the k kept logits are shifted and scaled (the top-k of the raw logits is the same
        # set: the shift and scale keep their order).
        ids = None
        if top_k:
            group, ids = torch.topk(group, top_k)  # sorted, largest first
            group = (group - group[:, :1]) / temperature
        else:
            group = (group - group.max(dim=-1, keepdim=True).values) / temperature
        for j, i in enumerate(rows):
            out[i] = _draw(group[j], None if ids is None else ids[j], settings[i][2], generators[i])
    return out


def _draw(logits: torch.Tensor, ids: torch.Tensor | None, top_p: float | None, generator) -> int:
    """The top-p filter and the draw of `sample_next`, after temperature and top-k (ids: the
    token ids of a top-k's logits, None for the whole vocabulary)."""
    if top_p is not None and top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does (the first token is always kept).
        before = torch.cumsum(probs, dim=-1) - probs
        logits = logits.masked_fill(before >= top_p, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return choice if ids is None else int(ids[choice])


def window_keep(block_size: int) -> int:
    """Tokens the window keeps when it hops (and of a prompt longer than the context)."""
    return max(1, block_size - max(1, block_size // 4))


def window_start(n_tokens: int, start: int, block_size: int) -> int:
    """Where the window over `n_tokens` tokens begins: at `start` while the tokens from
    there fit the context, else (a hop) at the newest window_keep(block_size) tokens."""
    return n_tokens - window_keep(block_size) if n_tokens - start > block_size else start


def prompt_fit(model: GPT, prompt_ids: Sequence[int], vocab=None) -> tuple[int, int]:
    """(prompt tokens dropped because the prompt is longer than the context, kept prompt
    tokens a compact vocabulary does not hold and the model reads as its unknown token)."""
    ids = [int(t) for t in prompt_ids]
    block = model.config.block_size
    dropped = window_start(len(ids), 0, block)
    unknown = 0
    if vocab is not None and ids[dropped:]:  # only the tokens the model reads
        unknown = int((vocab.to_compact(ids[dropped:]) == vocab.unk_id).sum())
    return dropped, unknown


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    try:
        gen = torch.Generator(device=device)
    except RuntimeError:  # a device without its own generator: draw on the CPU
        gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _check_prompt(prompt: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt's model ids as a list, or ValueError if it is empty or out of range."""
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    tokens = [int(t) for t in prompt]
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt ids must lie in [0, {vocab_size}); got {bad[:5]}")
    return tokens


def _model_eos(eos_id: int | None, vocab) -> int | None:
    """The model id of the end-of-text token `eos_id` (a GPT-2 id), None to never stop."""
    if vocab is None or eos_id is None:
        return eos_id
    return vocab.eot_id if eos_id == EOT else int(vocab.to_compact([eos_id])[0])


class Decoder:
    """The next-token logits of one growing sequence of model ids, with or without a cache.

    `logits()` gives the float32 logits (vocab,) for the token after `tokens`; `push(id)`
    appends a token. The model sees `tokens[start:]` (see the module docstring).
    """

    @torch.inference_mode()
    def __init__(self, model: GPT, prompt: Sequence[int], *, use_cache: bool = True):
        self.model = model
        self.block_size = model.config.block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tokens = _check_prompt(prompt, model.config.vocab_size)
        self.cache = KVCache(model.config, 1, device=self.device, dtype=self.dtype) if use_cache else None
        self.start = window_start(len(self.tokens), 0, self.block_size)
        self.truncated = self.start  # prompt tokens that did not fit the context
        self.prefills = 0  # full-window runs (for tests and the benchmark)
        self._logits = self._run_window()

    def _forward(self, ids: list[int]) -> torch.Tensor:
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits, _ = self.model(idx, kv_cache=self.cache)
        return logits[0, -1].float()

    def _run_window(self) -> torch.Tensor:
        if self.cache is not None:
            self.cache.length = 0
        self.prefills += 1
        return self._forward(self.tokens[self.start :])

    def logits(self) -> torch.Tensor:
        return self._logits

    @torch.inference_mode()
    def push(self, token: int) -> None:
        self.tokens.append(int(token))
        start = window_start(len(self.tokens), self.start, self.block_size)
        if start != self.start:  # a hop
            self.start = start
            self._logits = self._run_window()
        elif self.cache is None:
            self._logits = self._run_window()
        else:
            self._logits = self._forward(self.tokens[-1:])


def _to_model_ids(prompt_ids: Sequence[int], vocab) -> list[int]:
    ids = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
    if vocab is not None:
        ids = [int(t) for t in vocab.to_compact(ids)]
    return ids


def iter_tokens(
    model: GPT,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = EOT,
    vocab=None,
    use_cache: bool = True,
    decoder_out: list | None = None,
) -> Iterator[int]:
    """Yield new GPT-2 ids one at a time (see `generate`). `decoder_out`, if a list, gets
    the `Decoder` appended (to read `truncated` after the first token)."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    eos = _model_eos(eos_id, vocab)
    decoder = Decoder(model, _to_model_ids(prompt_ids, vocab), use_cache=use_cache)
    if decoder_out is not None:
        decoder_out.append(decoder)
    generator = _make_generator(seed, decoder.device)
    for step in range(max_new_tokens):
        token = sample_next(
            decoder.logits(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eos is not None and token == eos:
            return
        yield int(vocab.to_gpt2([token])[0]) if vocab is not None else token
        if step + 1 < max_new_tokens:
            decoder.push(token)


def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = EOT,
    vocab=None,
    use_cache: bool = True,
) -> list[int]:
    """The new GPT-2 ids after `prompt_ids` (GPT-2 ids), without the end-of-text token.

    temperature 0 is greedy; top_k 0/None and top_p 1/None are off; the same seed gives the
    same ids; eos_id=None never stops early; vocab maps a compact-vocabulary model.
    """
    return list(
        iter_tokens(
            model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, eos_id=eos_id, vocab=vocab, use_cache=use_cache,
        )
    )


class IncrementalDetokenizer:
    """GPT-2 ids in, text out: `push(id)` returns the text completed by that token (maybe
    ""), `flush()` the rest (an unfinished character becomes U+FFFD, as `decode` does)."""

    def __init__(self):
        self._enc = get_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._enc.decode_single_token_bytes(int(token)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def stream_text(model: GPT, prompt: str, *, vocab=None, **options) -> Iterator[str]:
    """Yield only the newly decoded text after `prompt` (plain text: a typed
    "<|endoftext|>" is ordinary characters). Options as for `generate`."""
    ids = encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: type some text to continue")
    detok = IncrementalDetokenizer()
    for token in iter_tokens(model, ids, vocab=vocab, **options):
        piece = detok.push(token)
        if piece:
            yield piece
    tail = detok.flush()
    if tail:
        yield tail
