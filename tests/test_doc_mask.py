"""Document masking in training (`doc_mask`): doc_ids from the end-of-text tokens, the config
field, checkpoints, training and evaluation with the same setting."""

import math
import random

import numpy as np
import pytest
import torch
from train_helpers import save_edited, small_args, small_config

from tsfast.config import MODEL_FIELDS, ConfigError, apply_overrides, preset
from tsfast.data.loader import BatchSampler, TokenData, doc_ids_from_eot
from tsfast.data.tokenizer import EOT
from tsfast.data.vocab import CompactVocab
from tsfast.model import GPT
from tsfast.train import checkpoint as ckpt_io
from tsfast.train.cli import main, parse
from tsfast.train.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _doc_ids_by_loop(windows: np.ndarray, eot: int) -> np.ndarray:
    """Plainly: start at 0, and a token right after an EOT starts the next document."""
    ids = np.zeros(windows.shape, dtype=np.int64)
    for b in range(windows.shape[0]):
        for t in range(1, windows.shape[1]):
            ids[b, t] = ids[b, t - 1] + (windows[b, t - 1] == eot)
    return ids


# ----------------------------------------------------------------------------- doc_ids from EOT


def test_doc_ids_from_eot_hand_made_rows():
    E = 9
    windows = np.array([
        [1, 2, E, 3, 4, 5],  # starts mid-story: the first story's tail is document 0
        [1, 2, 3, 4, 5, E],  # ends on an EOT: it belongs to the story it ends, no new document
        [E, E, 1, E, 2, 3],  # a lone EOT is a document of length 1
        [1, 2, 3, 4, 5, 6],  # no EOT: one document spans the whole row
    ])
    expected = np.array([
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [0, 1, 2, 2, 3, 3],
        [0, 0, 0, 0, 0, 0],
    ])
    ids = doc_ids_from_eot(windows, E)
    assert ids.dtype == np.int32 and np.array_equal(ids, expected)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 100), (2, 257)])
def test_doc_ids_from_eot_matches_a_plain_loop(shape):
    rng = np.random.default_rng(random.randrange(2**31))
    windows = rng.integers(0, 50, size=shape)
    windows[rng.random(shape) < rng.uniform(0.02, 0.5)] = 7
    ids = doc_ids_from_eot(windows, 7)
    assert np.array_equal(ids, _doc_ids_by_loop(windows, 7))
    assert (np.diff(ids, axis=1) >= 0).all()


def test_sampler_batch_gives_doc_ids_of_x(corpus):
    data = TokenData(corpus)
    batch, block = random.randrange(1, 9), random.choice([1, 17, 100, 257])
    seed, step = random.randrange(2**31), random.randrange(10**6)
    plain = BatchSampler(data.train, batch, block, seed=seed)
    masked = BatchSampler(data.train, batch, block, seed=seed, eot_token=EOT)
    assert plain.batch(step)[2] is None
    x, y, docs = masked.batch(step)
    x0, y0 = plain.get(step)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert docs.dtype == torch.int32 and docs.shape == (batch, block)
    assert np.array_equal(docs.numpy(), _doc_ids_by_loop(x.numpy(), EOT))


def test_sampler_doc_ids_read_the_eot_before_the_compact_map(corpus):
    data = TokenData(corpus)
    vocab = CompactVocab.from_prepared(corpus)
    assert vocab.eot_id != EOT
    sampler = BatchSampler(data.train, 6, 100, seed=random.randrange(2**31), eot_token=EOT,
                           token_map=vocab.lookup_table())
    x, _, docs = sampler.batch(random.randrange(10**6))
    assert np.array_equal(docs.numpy(), _doc_ids_by_loop(x.numpy(), vocab.eot_id))
    assert int(docs[:, -1].max()) >= 1  # 100 tokens of ~130-token stories: boundaries happen


def test_rows_starting_mid_story_and_ending_on_eot():
    """Every window of a short stream: positions restart right after each EOT only."""
    E = EOT
    tokens = np.array([5, 6, E, 7, E, 8, 9, 10, E, 11, 12], dtype=np.uint16)
    sampler = BatchSampler(tokens, 64, 5, seed=random.randrange(2**31), eot_token=E)
    x, _, docs = sampler.batch(0)
    starts = sampler.offsets(0)
    assert set(starts.tolist()) == set(range(len(tokens) - 5))  # 64 draws of 6 starts
    for row, start in enumerate(starts):
        window = tokens[start : start + 5].astype(np.int64)
        assert np.array_equal(docs[row].numpy(), _doc_ids_by_loop(window[None], E)[0])
    ends_on_eot = [r for r, s in enumerate(starts) if tokens[s + 4] == E]
    assert ends_on_eot and all(int(docs[r, -1]) == int(docs[r, -2]) for r in ends_on_eot)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("text,value", [("true", True), ("false", False), ("yes", True), ("0", False)])
def test_doc_mask_flag_is_a_bool(text, value):
    cfg, _, _ = parse(["--config", "tiny", "--doc_mask", text])
    assert cfg.doc_mask is value
    assert apply_overrides(preset("baby_cpu"), {"doc_mask": text}).doc_mask is value
    assert parse(["--config", "tiny", "--no-doc_mask"])[0].doc_mask is False
    assert parse(["--config", "tiny", "--doc_mask"])[0].doc_mask is True


def test_doc_mask_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"doc_mask.*not a bool"):
        apply_overrides(preset("tiny"), {"doc_mask": "maybe"})


def test_doc_mask_is_part_of_the_model_contract():
    assert "doc_mask" in MODEL_FIELDS


def test_doc_mask_defaults():
    """On where it measured no worse (BENCHMARKS.md); off in the dataclass (what checkpoints
    that predate the field were trained with) and in the GPU presets (unmeasured)."""
    from tsfast.config import TrainConfig

    assert TrainConfig().doc_mask is False
    assert {name: preset(name).doc_mask for name in ("tiny", "baby_cpu", "baby_gpu", "gpt2")} == {
        "tiny": True, "baby_cpu": True, "baby_gpu": False, "gpt2": False}


# ----------------------------------------------------------------------------- training, eval


class _Spy:
    """Records the doc_ids every GPT.forward call gets (training and evaluation alike)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = GPT.forward

        def forward(model, idx, targets=None, **kwargs):
            self.calls.append((idx.clone(), kwargs.get("doc_ids"), model.training))
            return original(model, idx, targets, **kwargs)

        monkeypatch.setattr(GPT, "forward", forward)


@pytest.mark.parametrize("doc_mask", [True, False])
def test_tiny_run_trains_and_evaluates_with_its_setting(corpus, tmp_path, monkeypatch, doc_mask):
    spy = _Spy(monkeypatch)
    cfg = small_config(corpus, tmp_path, doc_mask=doc_mask, max_iters=60, eval_interval=60,
                       batch_size=8, lr=1e-2, warmup_iters=5, log_interval=10)
    result = train(cfg)
    # well below a uniform guess over the compact vocabulary (~950 ids)
    assert result.step == 60 and result.best_val_loss < math.log(950) - 1.5
    assert {training for _, _, training in spy.calls} == {True, False}  # train and eval steps
    vocab = CompactVocab.from_prepared(corpus)
    for idx, doc_ids, _ in spy.calls:
        if not doc_mask:
            assert doc_ids is None
            continue
        assert doc_ids.shape == idx.shape
        assert np.array_equal(doc_ids.numpy(), _doc_ids_by_loop(idx.numpy(), vocab.eot_id))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["train_config"]["doc_mask"] is doc_mask
    assert ckpt_io.load_for_inference(tmp_path / "ckpt.pt", device="cpu").doc_mask is doc_mask


def test_evaluation_uses_the_training_setting(corpus, tmp_path):
    cfg = small_config(corpus, tmp_path, doc_mask=True, block_size=64)
    trainer = Trainer(cfg)
    try:
        got = trainer.evaluate()
        sampler = trainer.eval_samplers["val"]
        with torch.no_grad():
            trainer.model.eval()
            masked, plain = [], []
            for i in range(cfg.eval_iters):
                x, y, doc_ids = sampler.batch(i)
                assert int(doc_ids.max()) >= 1  # 64-token rows of ~130-token stories
                masked.append(trainer.model(x, y, doc_ids=doc_ids)[1].item())
                plain.append(trainer.model(x, y)[1].item())
    finally:
        trainer.close()
    assert got["val"] == pytest.approx(np.mean(masked), rel=1e-6)
    assert abs(np.mean(masked) - np.mean(plain)) > 1e-4


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def masked_out(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("masked")
    train(small_config(corpus, out, doc_mask=True, max_iters=2, eval_interval=2))
    return out


def test_resume_keeps_doc_mask_and_refuses_another(corpus, masked_out, capsys):
    cfg, resume, _ = parse(["--resume", "--out_dir", str(masked_out)])
    assert cfg.doc_mask is True and resume["train_config"]["doc_mask"] is True
    assert main(small_args(corpus, masked_out, doc_mask=False) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "doc_mask=True in the checkpoint, False asked" in err and "--doc_mask true" in err


def test_checkpoints_without_doc_mask_read_as_false(corpus, masked_out, tmp_path):
    for name in ("ckpt.pt", "resume.pt"):
        ckpt = torch.load(masked_out / name, weights_only=True)
        old = {k: v for k, v in ckpt["train_config"].items() if k != "doc_mask"}
        save_edited(tmp_path / name, ckpt, train_config=old)
    assert ckpt_io.load_for_inference(tmp_path / "ckpt.pt", device="cpu").doc_mask is False
    cfg, _, _ = parse(["--resume", "--out_dir", str(tmp_path)])
    assert cfg.doc_mask is False
    with pytest.raises(ckpt_io.CheckpointError, match="doc_mask=False in the checkpoint, True asked"):
        parse(["--resume", "--out_dir", str(tmp_path), "--doc_mask", "true"])
