"""TokenData validation and BatchSampler: windows, determinism across processes, streams."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tsfast.data.loader import BatchSampler, TokenData
from tsfast.data.meta import DataError
from tsfast.data.prepare import prepare
from tsfast.data.vocab import CompactVocab


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    return prepare("synthetic", out, num_stories=300, seed=random.randrange(1000), workers=1, progress=False)


def test_token_data_opens_both_splits(data_dir):
    data = TokenData(data_dir)
    assert data.vocab_size == 50257 and data.name == "synthetic"
    for split in ("train", "val"):
        tokens = data.split(split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == data.meta["splits"][split]["tokens"]
        assert int(tokens[-1]) == 50256  # every story ends with EOT
        assert np.count_nonzero(tokens == 50256) == data.meta["splits"][split]["stories"]
    assert data.counts().sum() == len(data.train)


def test_windows_are_slices_of_the_tokens_and_y_is_shifted(data_dir):
    data = TokenData(data_dir)
    batch, block = random.randrange(1, 9), random.randrange(1, 65)
    sampler = BatchSampler(data.train, batch, block, seed=random.randrange(2**31))
    step = random.randrange(10**6)
    x, y = sampler.get(step)
    assert x.shape == y.shape == (batch, block) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    for row, start in enumerate(sampler.offsets(step)):
        window = torch.from_numpy(data.train[start : start + block + 1].astype(np.int64))
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])


def test_offsets_cover_every_start_and_stay_in_range():
    tokens = np.arange(20, dtype=np.uint16)
    sampler = BatchSampler(tokens, 8, 17, seed=random.randrange(2**31))
    starts = np.concatenate([sampler.offsets(step) for step in range(50)])
    assert set(starts.tolist()) == {0, 1, 2}  # len - block - 1 is the last start
    x, y = sampler.get(0)
    assert int(y.max()) <= 19


def test_same_key_same_batches_other_keys_differ(data_dir):
    tokens = TokenData(data_dir).train
    seed = random.randrange(2**31)

    def batches(**kwargs):
        args = {"seed": seed, "rank": 0, "stream": "train"} | kwargs
        sampler = BatchSampler(tokens, 4, 32, **args)
        return [sampler.get(step)[0] for step in range(3)]

    reference = batches()
    again = BatchSampler(tokens, 4, 32, seed=seed)
    # Resuming at step 2 draws what an uninterrupted run draws, whatever came before.
    assert torch.equal(again.get(2)[0], reference[2])
    assert all(torch.equal(a, b) for a, b in zip(batches(), reference, strict=True))
    for other in (batches(rank=1), batches(stream="val"), batches(seed=seed + 1)):
        assert not any(torch.equal(a, b) for a, b in zip(other, reference, strict=True))
    assert not torch.equal(reference[0], reference[1])


def test_batches_match_across_processes(data_dir):
    seed, rank = random.randrange(2**31), random.randrange(4)
    code = (
        "import sys, json; from tsfast.data.loader import TokenData, BatchSampler\n"
        f"s = BatchSampler.for_split(TokenData({str(data_dir)!r}), 'train', 3, 16, seed={seed}, rank={rank})\n"
        "print(json.dumps([s.get(step)[0].tolist() for step in (0, 7, 123456)]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    here = BatchSampler.for_split(TokenData(data_dir), "train", 3, 16, seed=seed, rank=rank)
    assert json.loads(result.stdout) == [here.get(step)[0].tolist() for step in (0, 7, 123456)]


def test_token_map_remaps_on_the_fly(data_dir):
    data = TokenData(data_dir)
    vocab = CompactVocab.from_counts(data.counts(), max_size=50)
    seed = random.randrange(2**31)
    plain = BatchSampler(data.train, 4, 24, seed=seed)
    mapped = BatchSampler(data.train, 4, 24, seed=seed, token_map=vocab.lookup_table())
    x, y = plain.get(5)
    cx, cy = mapped.get(5)
    assert torch.equal(cx, vocab.to_compact(x)) and torch.equal(cy, vocab.to_compact(y))
    assert int(cx.max()) < vocab.size
    with pytest.raises(ValueError, match="token_map must be an integer array of shape"):
        BatchSampler(data.train, 4, 24, seed=seed, token_map=np.zeros(10, dtype=np.int64))


def test_split_shorter_than_a_window_is_refused(data_dir):
    data = TokenData(data_dir)
    block = len(data.val)  # needs block + 1 tokens
    with pytest.raises(DataError, match=r"val\.bin: .* tokens, but block_size .* needs at least .*"
                                        r"lower block_size or prepare a bigger corpus"):
        BatchSampler.for_split(data, "val", 2, block, seed=0)
    BatchSampler.for_split(data, "val", 2, block - 1, seed=0).get(0)


def _copy(data_dir, tmp_path):
    target = tmp_path / "synthetic"
    target.mkdir()
    for path in data_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_damaged_data_is_refused(data_dir, tmp_path):
    copy = _copy(data_dir, tmp_path)
    tokens = np.fromfile(copy / "val.bin", dtype=np.uint16)
    tokens[random.randrange(len(tokens))] = random.randrange(50257, 65536)
    tokens.tofile(copy / "val.bin")
    with pytest.raises(DataError, match=r"val\.bin holds token id \d+, outside GPT-2's vocabulary"):
        TokenData(copy)
    TokenData(copy, check_tokens=False, check_sha256=False)  # the size check alone passes
    with open(copy / "train.bin", "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(DataError, match=r"train\.bin has \d+ bytes but .*meta\.json says"):
        TokenData(copy, check_tokens=False, check_sha256=False)
    (copy / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json is unreadable"):
        TokenData(copy)
    with pytest.raises(DataError, match=r"meta\.json not found.*--dataset synthetic"):
        TokenData(tmp_path / "nothing" / "synthetic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_equal_cpu_batches(data_dir):
    data = TokenData(data_dir)
    seed = random.randrange(2**31)
    on_cpu = BatchSampler.for_split(data, "train", 8, 64, seed=seed)
    on_gpu = BatchSampler.for_split(data, "train", 8, 64, seed=seed, device="cuda")
    for step in range(3):
        x, y = on_gpu.get(step)
        assert x.device.type == "cuda" and y.device.type == "cuda"
        cx, cy = on_cpu.get(step)
        assert torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)


def _edit_meta(directory, **changes):
    meta = json.loads((directory / "meta.json").read_text())
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        target = meta
        for part in path:
            target = target[part]
        target[key] = value
    (directory / "meta.json").write_text(json.dumps(meta))


# case: (damage to a copy of a prepared corpus, words of the one-line DataError)
DAMAGE = {
    "empty val split": (lambda d: ((d / "val.bin").write_bytes(b""), _edit_meta(d, **{"splits.val.tokens": 0})),
                        "split 'val': tokens is 0, expected a whole number >= 1 (an empty split"),
    "splits a list": (lambda d: _edit_meta(d, splits=[]), "splits is [], expected an object with train and val"),
    "file a number": (lambda d: _edit_meta(d, **{"splits.train.file": 123}),
                      "split 'train': file is 123, expected a file name inside"),
    "file outside": (lambda d: _edit_meta(d, **{"splits.val.file": "../val.bin"}),
                     "split 'val': file is '../val.bin', expected a file name inside"),
    "tokens a float": (lambda d: _edit_meta(d, **{"splits.train.tokens": 1.5}), "tokens is 1.5"),
    "counts of zeros": (lambda d: np.save(d / "counts.npy", np.zeros(50257, dtype=np.int64)),
                        "counts.npy counts 0 tokens (0 distinct) but"),
    "train.bin of other ids": (lambda d: np.random.default_rng().integers(0, 50257, (d / "train.bin").stat().st_size // 2,
                                                                          dtype=np.uint16).tofile(d / "train.bin"),
                               "train.bin: sha256 "),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_field_training_reads_is_checked(data_dir, tmp_path, case):
    damage, words = DAMAGE[case]
    copy = _copy(data_dir, tmp_path)
    damage(copy)
    with pytest.raises(DataError) as err:
        TokenData(copy)
        CompactVocab.from_prepared(copy)
    message = str(err.value)
    assert words in message and "\n" not in message, message
    assert message.endswith(f"prepare it again with `uv run python -m tsfast.data.prepare --dataset synthetic "
                            f"--out {tmp_path}`")


def test_damaged_data_stops_train_py_and_prepare_check(data_dir, tmp_path, capsys):
    from tsfast.data import prepare as prep
    from tsfast.train.cli import main

    copy = _copy(data_dir, tmp_path)
    np.save(copy / "counts.npy", np.zeros(50257, dtype=np.int64))
    out = tmp_path / "out"
    assert main(["--config", "tiny", "--data", str(copy), "--device", "cpu", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: {copy / 'counts.npy'} counts 0 tokens") and err.count("\n") == 1
    assert not out.exists()  # refused before it wrote anything
    _edit_meta(copy, splits=[])
    assert prep.main(["--check", "--dataset", "synthetic", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "splits is [], expected an object with train and val" in err and "Traceback" not in err
