"""The training loop in-process on CPU: learning, logging, evaluation isolation, exact resume,
the NaN guard, WandB."""

import math
import sys
import types

import numpy as np
import pytest
import torch
from train_helpers import read_metrics, small_args, small_config

from tsfast.config import preset
from tsfast.model import GPT
from tsfast.train import checkpoint as ckpt_io
from tsfast.train.cli import main
from tsfast.train.loop import train
from tsfast.train.schedule import lr_at

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_few_steps_of_tiny_lower_the_loss(corpus, tmp_path):
    cfg = small_config(corpus, tmp_path, max_iters=60, eval_interval=60, batch_size=8, lr=1e-2, warmup_iters=5)
    result = train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5, losses
    ev = read_metrics(tmp_path, "eval")[-1]
    # below a uniform guess over the vocabulary by a wide margin
    assert result.step == 60 and result.best_val_loss == ev["val_loss"] < math.log(950) - 1.5
    # the best model is loadable for inference with its compact vocabulary
    loaded = ckpt_io.load_for_inference(tmp_path / "ckpt.pt", device="cpu")
    assert loaded.step == 60 and loaded.name == "tiny" and not loaded.model.training
    assert loaded.vocab is not None and loaded.model.config.vocab_size == loaded.vocab.size
    assert loaded.val_loss == pytest.approx(ev["val_loss"])


def test_log_records_hold_the_throughput_numbers(corpus, tmp_path, capsys):
    train(small_config(corpus, tmp_path, max_iters=4, log_interval=2, eval_interval=4))
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert set(r) == {"type", "step", "loss", "lr", "ms", "tokens_per_s", "tflops", "mfu"}
        assert r["ms"] > 0 and r["tflops"] > 0 and r["mfu"] is None  # CPU: no known peak
        assert r["tokens_per_s"] == pytest.approx(4 * 32 * 1000 / r["ms"])
    out = capsys.readouterr().out
    assert "iter      2 | loss" in out and "tok/s" in out and "TFLOPS" in out and "MFU" not in out
    assert "parameters" in out


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = preset("tiny")
    lrs = [lr_at(s, cfg) for s in range(cfg.max_iters + 1)]
    assert lrs[0] < lrs[cfg.warmup_iters - 1] < cfg.lr
    assert lrs[cfg.warmup_iters] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[cfg.warmup_iters :], lrs[cfg.warmup_iters + 1 :], strict=False))
    assert lrs[-1] == pytest.approx(cfg.min_lr)


def test_evaluation_never_touches_the_training_stream(corpus, tmp_path):
    """Training losses are identical whether evaluation runs every step or only at the end."""
    kw = dict(max_iters=6, dropout=0.1, eval_iters=3)
    train(small_config(corpus, tmp_path / "often", eval_interval=1, **kw))
    train(small_config(corpus, tmp_path / "rarely", eval_interval=1000, **kw))
    often, rarely = read_metrics(tmp_path / "often"), read_metrics(tmp_path / "rarely")
    assert [r["loss"] for r in often] == [r["loss"] for r in rarely]
    assert len(read_metrics(tmp_path / "often", "eval")) == 6 and len(read_metrics(tmp_path / "rarely", "eval")) == 1


def test_resume_continues_exactly(corpus, tmp_path):
    """N steps straight == N/2 steps, resume, N/2 steps: bitwise equal losses and weights
    (fp32 CPU, with dropout and gradient accumulation, so RNG and optimizer state matter)."""
    kw = dict(max_iters=8, eval_interval=3, dropout=0.1, grad_accum=2)
    train(small_config(corpus, tmp_path / "straight", **kw))
    half = train(small_config(corpus, tmp_path / "split", **kw), stop_at=4)
    assert half.step == 4 and half.stopped_by == "stop_at"
    assert main(small_args(corpus, tmp_path / "split", **kw) + ["--resume"]) == 0
    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    assert [r["loss"] for r in straight] == [r["loss"] for r in split]
    a = torch.load(tmp_path / "straight" / "resume.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "resume.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_resume_checkpoint_holds_everything(corpus, tmp_path):
    train(small_config(corpus, tmp_path, max_iters=3))
    r = torch.load(tmp_path / "resume.pt", weights_only=True)
    for key in ("model", "model_config", "train_config", "vocab", "step", "best_val_loss", "val_loss",
                "optimizer", "scaler", "rng", "data_step", "wandb_run_id", "format_version"):
        assert key in r, key
    assert r["step"] == 3 and r["data_step"] == 3 and r["train_config"]["n_embd"] == 32
    assert set(r["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert isinstance(r["vocab"]["gpt2_ids"], list)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    original = GPT.forward
    calls = {"train": 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 5:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    code = main(small_args(corpus, tmp_path, max_iters=20, eval_interval=2))
    err = capsys.readouterr().err
    assert code == 1
    assert "not finite" in err and "iteration 5" in err and "ckpt.pt" in err
    kept = ckpt_io.read_checkpoint(tmp_path / "ckpt.pt")
    assert kept["step"] == 4 and all(torch.isfinite(t).all() for t in kept["model"].values())
    assert ckpt_io.read_checkpoint(tmp_path / "resume.pt", resume=True)["step"] == 4


def test_wandb_offline_run_writes_its_files(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(small_config(corpus, tmp_path / "out", max_iters=2, eval_interval=2, wandb=True))
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = torch.load(tmp_path / "out" / "resume.pt", weights_only=True)["wandb_run_id"]
    assert run_id and runs[0].name.endswith(run_id)


class _FakeWandb(types.ModuleType):
    def __init__(self, fail_init=False):
        super().__init__("wandb")
        self.calls = []
        self.fail_init = fail_init

    def init(self, **kw):
        self.calls.append("init")
        if self.fail_init:
            raise ConnectionError("api.wandb.ai unreachable")
        raise AssertionError("wandb.init with WandB off")

    def log(self, *a, **kw):
        self.calls.append("log")
        raise AssertionError("wandb.log with WandB off")


def test_wandb_off_never_calls_wandb(corpus, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(small_config(corpus, tmp_path, max_iters=2, eval_interval=2, wandb=False))
    assert fake.calls == []


def test_unreachable_wandb_does_not_crash_the_run(corpus, tmp_path, monkeypatch, capsys):
    fake = _FakeWandb(fail_init=True)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    result = train(small_config(corpus, tmp_path, max_iters=2, eval_interval=2, wandb=True))
    assert result.step == 2 and fake.calls == ["init"]
    assert "WandB could not start" in capsys.readouterr().err


def test_sample_at_end_reads_as_text(corpus, tmp_path, capsys):
    result = train(small_config(corpus, tmp_path, max_iters=2, eval_interval=2, sample_at_end=True))
    assert result.sample.startswith("Once upon a time") and len(result.sample) > len("Once upon a time")
    assert "sample after 2 iterations:" in capsys.readouterr().out


def test_different_seeds_draw_different_batches(corpus, tmp_path):
    train(small_config(corpus, tmp_path / "a", max_iters=2, eval_interval=2, seed=int(np.random.randint(1, 1000))))
    train(small_config(corpus, tmp_path / "b", max_iters=2, eval_interval=2, seed=1000 + int(np.random.randint(1, 1000))))
    assert read_metrics(tmp_path / "a")[0]["loss"] != read_metrics(tmp_path / "b")[0]["loss"]


def test_meter_prints_per_kernel_lines(corpus, tmp_path, capsys):
    from tsfast import meter

    train(small_config(corpus, tmp_path, max_iters=2, log_interval=2, eval_interval=2, meter=True))
    out = capsys.readouterr().out
    for op in ("rope_attention", "layernorm_linear", "layer_norm", "linear_cross_entropy"):
        assert f"    {op}" in out and "% of step" in out
    assert meter.active() is None  # switched off again at the end of the run


def test_kernels_choice_holds_for_the_run_only(corpus, tmp_path, monkeypatch):
    from tsfast import ops

    seen = []
    original = GPT.forward

    def spy(self, *a, **kw):
        seen.append(ops.get_backend())
        return original(self, *a, **kw)

    monkeypatch.setattr(GPT, "forward", spy)
    with ops.use("auto"):
        train(small_config(corpus, tmp_path, max_iters=1, eval_interval=1, kernels="torch"))
        assert ops.get_backend() == "auto"
    assert seen and set(seen) == {"torch"}


@pytest.mark.parametrize("name", ["tiny", "baby_cpu", "gpt2"])
@pytest.mark.parametrize("bias, pos", [(True, "rope"), (False, "rope"), (False, "learned")])
def test_memory_estimate_counts_the_models_parameters(name, bias, pos):
    """The weights + gradients + AdamW part of the estimate check_memory refuses runs with:
    16 bytes for each parameter the model has (meta tensors: nothing is allocated)."""
    import dataclasses

    from tsfast.train import runtime

    cfg = dataclasses.replace(preset(name), bias=bias, pos=pos)
    with torch.device("meta"):
        model = GPT(cfg.model_config(50257))
    _, state, _ = runtime.memory_estimate(cfg)
    assert state == 16 * model.num_params()
