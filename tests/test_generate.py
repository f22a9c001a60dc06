"""tsfast.generate on small random models (CPU): the KV cache against re-running the window,
the sliding window past the context, sampling filters, seeds, and streaming text."""

from __future__ import annotations

import random

import pytest
import torch

from tsfast.config import GPTConfig
from tsfast.data.tokenizer import EOT, decode, encode
from tsfast.generate import (
    Decoder,
    IncrementalDetokenizer,
    check_sampling,
    generate,
    iter_tokens,
    prompt_fit,
    sample_next,
    sample_rows,
    stream_text,
    window_keep,
)
from tsfast.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BLOCK = 32


def random_model(pos: str = "rope", vocab_size: int = 384, block_size: int = BLOCK, std: float = 0.3) -> GPT:
    """A GPT whose weights are large enough that attention is sharp and positions matter
    (at GPT-2's init std of 0.02 every position looks alike and a cache bug would hide)."""
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=64, block_size=block_size, vocab_size=vocab_size, pos=pos)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def window_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return logits[0, -1].float()


def top2_gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_cached_logits_match_rerunning_the_window_at_every_step(pos):
    """Teacher-force random tokens for three context lengths: at every step the cached
    logits equal the uncached ones and the model run on the window itself."""
    model = random_model(pos)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (random.randint(1, BLOCK - 1),)).tolist()
    cached, plain = Decoder(model, prompt), Decoder(model, prompt, use_cache=False)
    steps = 3 * BLOCK
    for _ in range(steps):
        assert cached.tokens == plain.tokens and cached.start == plain.start
        window = plain.tokens[plain.start :]
        assert len(window) <= BLOCK
        ref = window_logits(model, window)
        torch.testing.assert_close(plain.logits(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.logits(), ref, rtol=1e-4, atol=1e-4)
        token = int(torch.randint(0, V, ()))
        cached.push(token)
        plain.push(token)
    assert len(cached.tokens) == len(prompt) + steps
    # The cache re-ran its window only when the window hopped (about every BLOCK/4 tokens).
    hops = cached.prefills - 1
    assert 1 <= hops <= steps // (BLOCK // 4) + 1
    assert plain.prefills == steps + 1


def test_dropping_the_oldest_cache_entries_would_not_match():
    """Why the window hops and re-runs: on this model, sliding the rotary cache by dropping
    its oldest entries gives logits far from the model run on the same window."""
    from tsfast.model import KVCache

    model = random_model("rope")
    toks = torch.randint(0, model.config.vocab_size, (1, BLOCK + 8))
    cache = KVCache(model.config, 1, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(toks[:, :BLOCK], kv_cache=cache)
        # slide: forget the oldest position
        for buf in (cache.k, cache.v):
            buf[:, :, :, : BLOCK - 1] = buf[:, :, :, 1:BLOCK].clone()
        cache.length = BLOCK - 1
        slid, _ = model(toks[:, BLOCK : BLOCK + 1], kv_cache=cache)
    ref = window_logits(model, toks[0, 1 : BLOCK + 1].tolist())
    assert (slid[0, -1] - ref).abs().max() > 1e-2


def assert_same_or_tie(model, prompt, a: list[int], b: list[int]):
    """a == b, unless they part at a step whose best two logits tie within rounding."""
    if a == b:
        return
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    dec = Decoder(model, prompt + a[:i], use_cache=False)
    assert top2_gap(dec.logits()) < 1e-4, f"outputs part at step {i} without a near-tie"


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_greedy_and_seeded_outputs_identical_with_and_without_cache(pos):
    model = random_model(pos)
    prompt = torch.randint(0, model.config.vocab_size, (random.randint(1, BLOCK + 10),)).tolist()
    n = 2 * BLOCK + 5  # well past the context
    for options in ({"temperature": 0.0}, {"temperature": 1.0, "seed": random.randint(0, 2**31)}):
        a = generate(model, prompt, max_new_tokens=n, eos_id=None, **options)
        b = generate(model, prompt, max_new_tokens=n, eos_id=None, use_cache=False, **options)
        assert len(a) == len(b) == n
        assert_same_or_tie(model, prompt, a, b)


def test_prompt_longer_than_the_context_keeps_its_newest_tokens():
    model = random_model("rope")
    prompt = torch.randint(0, model.config.vocab_size, (BLOCK + random.randint(1, 40),)).tolist()
    dec = Decoder(model, prompt)
    keep = window_keep(BLOCK)
    assert dec.truncated == len(prompt) - keep and 0 < keep < BLOCK
    torch.testing.assert_close(dec.logits(), window_logits(model, prompt[-keep :]), rtol=1e-4, atol=1e-4)


def test_seeds_reproduce_and_leave_the_global_rng_alone():
    model = random_model("rope")
    prompt = torch.randint(0, model.config.vocab_size, (5,)).tolist()
    seed = random.randint(0, 2**31)
    state = torch.get_rng_state()
    a = generate(model, prompt, max_new_tokens=40, temperature=1.0, seed=seed, eos_id=None)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(model, prompt, max_new_tokens=40, temperature=1.0, seed=seed, eos_id=None)
    c = generate(model, prompt, max_new_tokens=40, temperature=1.0, seed=seed + 1, eos_id=None)
    assert a == b
    assert a != c


def test_stops_at_the_end_of_text_token():
    model = random_model("rope")
    prompt = torch.randint(0, model.config.vocab_size, (6,)).tolist()
    greedy = generate(model, prompt, max_new_tokens=20, temperature=0, eos_id=None)
    stop = max(i for i, t in enumerate(greedy) if greedy.index(t) == i)  # last first-occurrence
    out = generate(model, prompt, max_new_tokens=20, temperature=0, eos_id=greedy[stop])
    assert out == greedy[:stop]
    assert generate(model, prompt, max_new_tokens=0, temperature=0) == []


def test_sample_next_filters():
    V = 1000
    logits = torch.randn(V) * 3
    gen = torch.Generator().manual_seed(random.randint(0, 2**31))
    best = int(logits.argmax())
    assert sample_next(logits, temperature=0) == best
    assert sample_next(logits, temperature=1.0, top_k=1, generator=gen) == best
    assert sample_next(logits, temperature=1.0, top_p=1e-6, generator=gen) == best
    k = random.randint(2, 20)
    allowed = set(torch.topk(logits, k).indices.tolist())
    assert {sample_next(logits, temperature=1.5, top_k=k, generator=gen) for _ in range(300)} <= allowed

    # Nucleus: probabilities 0.5, 0.3, 0.15, 0.05 at random places.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    where = torch.randperm(V)[:4]
    logits = torch.full((V,), -1e9)
    logits[where] = probs.log()
    draws = [sample_next(logits, temperature=1.0, top_p=0.7, generator=gen) for _ in range(2000)]
    assert set(draws) == {int(where[0]), int(where[1])}
    share = draws.count(int(where[0])) / len(draws)
    assert abs(share - 0.5 / 0.8) < 0.05  # renormalized over the kept two
    assert {sample_next(logits, temperature=1.0, top_p=0.5, generator=gen) for _ in range(50)} == {int(where[0])}
    draws = [sample_next(logits, temperature=1.0, generator=gen) for _ in range(4000)]
    assert abs(draws.count(int(where[3])) / len(draws) - 0.05) < 0.015


def test_sample_rows_draws_what_sample_next_draws_row_by_row():
    V, B = random.choice([97, 1000]), 17
    logits = torch.randn(B, V) * 3
    settings = [(random.choice([0.0, 0.5, 1.0, 1.3]), random.choice([None, 0, 1, 7, 50, V + 5]),
                 random.choice([None, 1.0, 0.3, 0.9])) for _ in range(B)]
    seeds = [random.randint(0, 2**31) for _ in range(B)]
    gens_a = [torch.Generator().manual_seed(s) for s in seeds]
    gens_b = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(3):  # three draws from each generator
        want = [sample_next(logits[i], temperature=t, top_k=k, top_p=p, generator=gens_a[i])
                for i, (t, k, p) in enumerate(settings)]
        assert sample_rows(logits, settings, gens_b) == want


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_settings_name_the_setting(bad, word):
    options = {"max_new_tokens": 10, "temperature": 0.8, "top_k": None, "top_p": None} | bad
    with pytest.raises(ValueError, match=word):
        check_sampling(**options)
    model = random_model("rope")
    with pytest.raises(ValueError, match=word):
        generate(model, [1, 2], **options)


def test_empty_or_out_of_vocabulary_prompts_are_refused():
    model = random_model("rope", vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        list(stream_text(model, "", max_new_tokens=3))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        generate(model, [5, 100], max_new_tokens=3)


def test_detokenizer_holds_back_split_characters():
    ids = encode("🙂")
    assert len(ids) == 2  # GPT-2 splits this emoji's 4 bytes over two tokens
    detok = IncrementalDetokenizer()
    assert detok.push(ids[0]) == ""
    assert detok.push(ids[1]) == "🙂"
    text = random.choice(["Lily saw a 🐶 and said こんにちは.", "дом 🙂 <|endoftext|> ok", "ça va? 😀😀"])
    ids = encode(text)
    detok = IncrementalDetokenizer()
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    # Random ids (broken UTF-8 included) join to what decode() gives, U+FFFD and all.
    ids = torch.randint(0, EOT, (300,)).tolist()
    detok = IncrementalDetokenizer()
    assert "".join([detok.push(t) for t in ids] + [detok.flush()]) == decode(ids)


def test_stream_text_joins_to_the_full_decode():
    model = random_model("rope", vocab_size=50257, std=0.1)
    seed = random.randint(0, 2**31)
    prompt = "Once upon a time 🙂"
    options = {"max_new_tokens": 60, "temperature": 1.0, "seed": seed, "eos_id": None}
    pieces = list(stream_text(model, prompt, **options))
    ids = generate(model, encode(prompt), **options)
    assert len(ids) == 60
    assert all(pieces) and "".join(pieces) == decode(ids)


def test_iter_tokens_is_lazy_and_reports_the_decoder():
    model = random_model("rope")
    box: list = []
    it = iter_tokens(model, [1, 2, 3], max_new_tokens=5, temperature=0, eos_id=None, decoder_out=box)
    assert box == []
    next(it)
    assert len(box) == 1 and box[0].tokens[:3] == [1, 2, 3]


def random_vocab(n: int):
    from tsfast.data.vocab import CompactVocab

    kept = torch.randperm(EOT)[: n - 2].tolist()  # plus end-of-text and unk
    return CompactVocab(sorted(kept + [EOT]))


def test_compact_vocabulary_maps_ids_both_ways():
    vocab = random_vocab(300)
    model = random_model("rope", vocab_size=vocab.size)
    kept = vocab.gpt2_ids.tolist()
    prompt = random.sample(kept, 6) + [random.choice([i for i in range(EOT) if i not in set(kept)])]  # one unknown
    seed = random.randint(0, 2**31)
    out = generate(model, prompt, max_new_tokens=40, temperature=1.0, seed=seed, vocab=vocab)
    compact_prompt = vocab.to_compact(prompt).tolist()
    assert compact_prompt[-1] == vocab.unk_id
    direct = generate(model, compact_prompt, max_new_tokens=40, temperature=1.0, seed=seed, eos_id=vocab.eot_id)
    assert out == vocab.to_gpt2(direct).tolist()
    assert set(out) <= set(kept) | {vocab.unk_gpt2_id}


def test_compact_vocabulary_stops_at_its_end_of_text_id():
    vocab = random_vocab(200)
    model = random_model("rope", vocab_size=vocab.size)
    with torch.no_grad():  # make the compact end-of-text id the likeliest next token everywhere
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.wte.weight[vocab.eot_id] = 10.0
    prompt = random.sample(vocab.gpt2_ids.tolist(), 5)
    assert generate(model, prompt, max_new_tokens=10, temperature=0, vocab=vocab) == []
    assert len(generate(model, prompt, max_new_tokens=10, temperature=0, vocab=vocab, eos_id=None)) == 10


def test_runs_in_the_model_dtype():
    model = random_model("rope", vocab_size=128)
    for p in model.parameters():  # parameters only: `model.to(bf16)` would also cast the fp32 rotary tables
        p.data = p.data.to(torch.bfloat16)
    prompt = torch.randint(0, 128, (5,)).tolist()
    cached, plain = Decoder(model, prompt), Decoder(model, prompt, use_cache=False)
    assert cached.cache.k.dtype == torch.bfloat16 and cached.logits().dtype == torch.float32
    for _ in range(4):
        torch.testing.assert_close(cached.logits(), plain.logits(), rtol=0.05, atol=0.1)
        token = int(torch.randint(0, 128, ()))
        cached.push(token)
        plain.push(token)


def test_prompt_fit_reports_dropped_and_unknown_tokens():
    vocab = random_vocab(100)
    model = random_model("rope", vocab_size=vocab.size)
    kept = vocab.gpt2_ids.tolist()
    unknown = [i for i in range(1000) if i not in set(kept)]
    n_unknown = random.randint(1, 5)
    prompt = random.sample(kept, 10) + random.sample(unknown, n_unknown)
    assert prompt_fit(model, prompt, vocab) == (0, n_unknown)
    assert prompt_fit(model, prompt, None) == (0, 0)
    long = random.choices(kept, k=BLOCK + 7)
    assert prompt_fit(model, long, vocab) == (BLOCK + 7 - window_keep(BLOCK), 0)
    assert Decoder(model, vocab.to_compact(long).tolist()).truncated == BLOCK + 7 - window_keep(BLOCK)


def test_prompt_fit_counts_unknown_tokens_among_the_kept_ones_only():
    vocab = random_vocab(100)
    model = random_model("rope", vocab_size=vocab.size)
    known = random.choices(vocab.gpt2_ids.tolist(), k=window_keep(BLOCK))
    unknown = [i for i in range(1000) if i not in set(vocab.gpt2_ids.tolist())]
    cut, kept_unknown = random.randint(BLOCK - window_keep(BLOCK) + 1, 40), random.randint(1, 5)
    prompt = random.sample(unknown, cut) + random.sample(unknown, kept_unknown) + known[kept_unknown:]
    assert prompt_fit(model, prompt, vocab) == (cut, kept_unknown)  # not cut + kept_unknown


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 1e-300, 5e-324, 1e-38])
def test_temperatures_that_underflow_act_greedy(temperature):
    logits = torch.randn(1000) * 5
    logits[random.randrange(1000)] = 30.0  # one clear favourite
    gen = torch.Generator().manual_seed(random.randint(0, 2**31))
    for top_k, top_p in ((None, None), (50, None), (None, 0.9)):
        assert sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen) == int(logits.argmax())
    model = random_model("rope")
    assert generate(model, [1, 2, 3], max_new_tokens=5, temperature=temperature, seed=1) == \
        generate(model, [1, 2, 3], max_new_tokens=5, temperature=0)
