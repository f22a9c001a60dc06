"""train.py's flags, and every bad input: one clear message, exit code 2, nothing overwritten."""

import subprocess
import sys

import pytest
import torch
from train_helpers import (  # noqa: F401
    TRAIN_PY,
    child_env,
    corpus,
    one_thread,
    small_args,
    small_config,
    snapshot,
)

from tsfast.train.cli import main, parse
from tsfast.train.loop import train


@pytest.fixture
def trained_out(corpus, tmp_path):  # noqa: F811
    """An output dir holding ckpt.pt, resume.pt and metrics.jsonl from a 2-step run."""
    out = tmp_path / "out"
    train(small_config(corpus, out, max_iters=2, eval_interval=2))
    return out


def test_no_config_picks_tiny_without_cuda_and_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg, resume, notes = parse([])
    assert cfg.name == "tiny" and resume is None and cfg.data == "auto" and cfg.vocab == "compact"
    assert any("tiny" in n and "no CUDA GPU" in n for n in notes)


def test_every_field_is_a_flag_and_set_works():
    cfg, _, _ = parse(["--config", "baby_cpu", "--lr", "2e-4", "--set", "n_layer=3", "--set", "pos=learned",
                       "--no-compile", "--wandb", "--meter", "false", "--device", "cpu", "--kernels", "torch"])
    assert (cfg.name, cfg.lr, cfg.n_layer, cfg.pos) == ("baby_cpu", 2e-4, 3, "learned")
    assert cfg.compile is False and cfg.wandb is True and cfg.meter is False
    assert (cfg.device, cfg.kernels) == ("cpu", "torch")
    gpu, _, notes = parse(["--config", "baby_gpu"])
    assert gpu.compile is True and any("torch.compile: on" in n for n in notes)
    assert parse(["--config", "baby_gpu", "--no-compile"])[0].compile is False


BAD_INPUTS = [
    (["--config", "huge"], ["unknown preset 'huge'", "tiny, baby_cpu, baby_gpu, gpt2"]),
    (["--set", "n_layers=4"], ["unknown config key 'n_layers'", "n_layer"]),
    (["--set", "lr"], ["key=value"]),
    (["--n_layers", "4"], ["unknown option '--n_layers'", "n_layer"]),
    (["--lr", "fast"], ["bad value for lr", "'fast'"]),
    (["--batch_size", "-1"], ["batch_size"]),
    (["--kernels", "cuda"], ["bad value for kernels", "auto, triton, torch"]),
    (["--device", "tpu"], ["bad value for device", "auto, cuda, mps, cpu"]),
]


@pytest.mark.parametrize("argv, words", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_flags(argv, words, trained_out, capsys):
    before = snapshot(trained_out)
    assert main(argv + ["--out_dir", str(trained_out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err
    assert snapshot(trained_out) == before


def _bad_run(argv, trained_out, capsys) -> str:
    before = snapshot(trained_out)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert snapshot(trained_out) == before
    assert "iter " not in captured.out
    return captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device(corpus, trained_out, capsys):  # noqa: F811
    err = _bad_run(small_args(corpus, trained_out, device="cuda"), trained_out, capsys)
    assert "no CUDA GPU is visible" in err and "--device cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_kernels_triton_where_triton_cannot_run(corpus, trained_out, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    err = _bad_run(small_args(corpus, trained_out, kernels="triton"), trained_out, capsys)
    assert "--kernels triton" in err and "CUDA GPU" in err and "--kernels auto or torch" in err


def test_resume_without_a_checkpoint(corpus, tmp_path, capsys):  # noqa: F811
    assert main(small_args(corpus, tmp_path / "empty") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "no resume checkpoint at" in err and "resume.pt" in err
    assert not (tmp_path / "empty").exists()


def test_resume_from_a_corrupt_checkpoint(corpus, trained_out, capsys):  # noqa: F811
    resume = trained_out / "resume.pt"
    resume.write_bytes(resume.read_bytes()[: resume.stat().st_size // 2])
    err = _bad_run(small_args(corpus, trained_out) + ["--resume"], trained_out, capsys)
    assert "not a readable checkpoint" in err and str(resume) in err


def test_resume_from_ckpt_pt_says_to_use_resume_pt(corpus, trained_out, capsys):  # noqa: F811
    err = _bad_run(small_args(corpus, trained_out) + ["--resume", str(trained_out / "ckpt.pt")], trained_out, capsys)
    assert "lacks optimizer" in err and "resume.pt" in err


def test_resume_a_checkpoint_of_another_architecture(corpus, trained_out, capsys):  # noqa: F811
    err = _bad_run(small_args(corpus, trained_out, n_embd=64) + ["--resume"], trained_out, capsys)
    assert "another architecture" in err and "n_embd=32 in the checkpoint, 64 asked" in err


def test_missing_data_dir(tmp_path, trained_out, capsys):
    err = _bad_run(small_args(tmp_path / "nowhere", trained_out), trained_out, capsys)
    assert "nowhere" in err and "prepare" in err


def test_resume_continues_with_the_checkpoint_config(corpus, trained_out, capsys):  # noqa: F811
    """--resume without --config takes the saved config; new flags (max_iters) apply."""
    assert main(["--resume", "--out_dir", str(trained_out), "--max_iters", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "iter      3" in out and "iter      1 " not in out


def test_bad_input_through_the_script(tmp_path):
    """The real process: exit status 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--config", "nope", "--out_dir", str(tmp_path)],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.py: error: unknown preset 'nope': choose one of tiny, baby_cpu, baby_gpu, gpt2"
    assert list(tmp_path.iterdir()) == []
