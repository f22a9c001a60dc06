"""The GPT model: loss, weight tying, positions, padding, the KV cache."""

import pytest
import torch
import torch.nn.functional as F

from tsfast.config import GPTConfig
from tsfast.model import GPT, KVCache


def _model(pos="rope", vocab=100, **kw):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=vocab, pos=pos, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_loss_is_cross_entropy_of_the_logits(pos):
    model = _model(pos, vocab=100)
    # The same weights read as a 128-token model show the padded rows' logits too.
    unpadded = GPT(GPTConfig(**{**model.config.__dict__, "vocab_size": 128})).eval()
    unpadded.load_state_dict(model.state_dict())
    idx = torch.randint(0, 100, (3, 17))
    targets = torch.randint(0, 100, (3, 17))
    targets[0, :5] = -100  # ignored positions do not count
    with torch.no_grad():
        logits, _ = model(idx, all_logits=True)
        padded, _ = unpadded(idx, all_logits=True)
        _, loss = model(idx, targets)
    assert logits.shape == (3, 17, 100) and padded.shape == (3, 17, 128)
    torch.testing.assert_close(logits, padded[..., :100])
    expected = F.cross_entropy(padded.reshape(-1, 128), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    last, _ = model(idx)
    torch.testing.assert_close(last, logits[:, -1:])


def test_embedding_is_tied_and_vocab_padded_to_64():
    model = _model(vocab=100)
    assert model.wte.weight.shape == (128, 32)
    # One tensor serves input and output: a gradient step on the loss moves the embedding
    # through the output layer too, and parameters() lists it once.
    names = [n for n, _ in model.named_parameters()]
    assert names.count("wte.weight") == 1 and not any("lm_head" in n for n in names)
    idx = torch.randint(0, 100, (2, 8))
    _, loss = model.train()(idx, torch.randint(0, 100, (2, 8)))
    loss.backward()
    unseen = torch.ones(128, dtype=torch.bool)
    unseen[idx.flatten()] = False
    assert model.wte.weight.grad[unseen].abs().sum() > 0  # only the output layer reaches these rows


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_kv_cache_decoding_matches_the_full_forward(pos):
    model = _model(pos)
    idx = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full, _ = model(idx, all_logits=True)
        cache = KVCache(model.config, 2, device="cpu", dtype=torch.float32)
        first, _ = model(idx[:, :7], kv_cache=cache, all_logits=True)
        steps = [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(7, 12)]
    torch.testing.assert_close(first, full[:, :7], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], rtol=1e-4, atol=1e-5)
    assert cache.length == 12


def test_positions_matter():
    """Swapping two tokens changes the last logits (the model is not a bag of words)."""
    for pos in ("rope", "learned"):
        model = _model(pos)
        idx = torch.randint(0, 100, (1, 10))
        swapped = idx.clone()
        swapped[0, [2, 5]] = idx[0, [5, 2]]
        if torch.equal(idx, swapped):
            swapped[0, 2] = (idx[0, 2] + 1) % 100
        with torch.no_grad():
            assert not torch.allclose(model(idx)[0], model(swapped)[0])


def test_context_longer_than_block_size_is_an_error():
    model = _model()
    with pytest.raises(ValueError, match="exceeds the context of 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_dropout_only_in_training():
    model = _model(dropout=0.5)
    idx = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])


def test_bf16_model_keeps_fp32_rotary_tables():
    from tsfast.config import preset
    from tsfast.model import GPT

    model = GPT(preset("tiny").model_config(vocab_size=200))
    cos = model.rope_cos.clone()
    model = model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, cos)
    logits, _ = model(torch.randint(0, 200, (1, 9)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
