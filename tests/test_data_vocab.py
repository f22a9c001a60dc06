"""CompactVocab: which tokens are kept, round trips, unk, torch and checkpoint round trip."""

import io

import numpy as np
import pytest
import torch

from tsfast.data.tokenizer import EOT
from tsfast.data.vocab import UNK_GPT2_ID, CompactVocab


def random_counts(rng: np.random.Generator, seen: int) -> np.ndarray:
    counts = np.zeros(50257, dtype=np.int64)
    ids = rng.choice(50257, size=seen, replace=False)
    counts[ids] = rng.integers(1, 1000, size=seen)
    return counts


def test_keeps_every_seen_token_plus_eot_and_unk():
    rng = np.random.default_rng()
    counts = random_counts(rng, int(rng.integers(10, 3000)))
    counts[EOT] = 0  # kept even when never counted
    vocab = CompactVocab.from_counts(counts)
    seen = np.flatnonzero(counts)
    assert vocab.size == len(seen) + 2 and vocab.unk_id == vocab.size - 1
    assert np.array_equal(vocab.gpt2_ids, np.sort(np.append(seen, EOT)))
    assert vocab.to_gpt2(np.array([vocab.eot_id]))[0] == EOT
    # Round trip for kept tokens; everything else goes to unk and back to "?".
    kept = rng.choice(vocab.gpt2_ids, size=200)
    assert np.array_equal(vocab.to_gpt2(vocab.to_compact(kept)), kept)
    unseen = np.setdiff1d(np.arange(50257), vocab.gpt2_ids)
    assert (vocab.to_compact(unseen) == vocab.unk_id).all()
    assert (vocab.to_gpt2(vocab.to_compact(unseen)) == UNK_GPT2_ID).all()
    compact = rng.integers(0, vocab.unk_id, size=300)  # every id but unk maps back to itself
    assert np.array_equal(vocab.to_compact(vocab.to_gpt2(compact)), compact)


def test_max_size_keeps_the_most_frequent_and_min_count_drops_rare():
    rng = np.random.default_rng()
    counts = random_counts(rng, 500)
    max_size = int(rng.integers(2, 400))
    vocab = CompactVocab.from_counts(counts, max_size=max_size)
    assert vocab.size == max_size and EOT in vocab.gpt2_ids
    kept = vocab.gpt2_ids[vocab.gpt2_ids != EOT]
    dropped = np.setdiff1d(np.flatnonzero(counts), vocab.gpt2_ids)
    if len(kept) and len(dropped):
        assert counts[kept].min() >= counts[dropped].max()
    threshold = int(rng.integers(2, 900))
    rare_dropped = CompactVocab.from_counts(counts, min_count=threshold)
    assert set(rare_dropped.gpt2_ids) == set(np.flatnonzero(counts >= threshold)) | {EOT}
    with pytest.raises(ValueError, match="max_size=1: must be at least 2"):
        CompactVocab.from_counts(counts, max_size=1)
    with pytest.raises(ValueError, match=r"counts must have shape \(50257,\)"):
        CompactVocab.from_counts(counts[:100])


def test_lookup_table_matches_to_compact():
    vocab = CompactVocab.from_counts(random_counts(np.random.default_rng(), 700))
    table = vocab.lookup_table()
    assert table.shape == (50257,) and table.dtype == np.int64
    assert np.array_equal(table, vocab.to_compact(np.arange(50257)))
    table[:] = 0  # a copy: the vocabulary is unchanged
    assert vocab.to_compact(np.array([EOT]))[0] == vocab.eot_id


def test_torch_tensors_map_like_numpy():
    rng = np.random.default_rng()
    vocab = CompactVocab.from_counts(random_counts(rng, 300))
    ids = rng.integers(0, 50257, size=(3, 40))
    out = vocab.to_compact(torch.from_numpy(ids).to(torch.int32))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    assert np.array_equal(out.numpy(), vocab.to_compact(ids))
    back = vocab.to_gpt2(out)
    assert np.array_equal(back.numpy(), vocab.to_gpt2(vocab.to_compact(ids)))


def test_out_of_range_ids_are_refused():
    vocab = CompactVocab.from_counts(random_counts(np.random.default_rng(), 50))
    with pytest.raises(ValueError, match=r"GPT-2 ids must lie in 0..50256"):
        vocab.to_compact(np.array([50257]))
    with pytest.raises(ValueError, match="compact ids must lie in"):
        vocab.to_gpt2(torch.tensor([vocab.size]))
    with pytest.raises(ValueError, match="must include the end-of-text token"):
        CompactVocab([1, 2, 3])


def test_state_dict_survives_a_weights_only_checkpoint():
    vocab = CompactVocab.from_counts(random_counts(np.random.default_rng(), 1234), max_size=1000)
    buffer = io.BytesIO()
    torch.save({"vocab": vocab.state_dict(), "weights": torch.zeros(2)}, buffer)
    buffer.seek(0)
    restored = CompactVocab.from_state_dict(torch.load(buffer, weights_only=True)["vocab"])
    assert restored == vocab
    assert (restored.size, restored.eot_id, restored.unk_id) == (vocab.size, vocab.eot_id, vocab.unk_id)
    assert np.array_equal(restored.lookup_table(), vocab.lookup_table())
    with pytest.raises(ValueError, match="not a compact vocabulary state"):
        CompactVocab.from_state_dict({"kind": "something else"})
