"""An NVIDIA GPU that is present but that the installed PyTorch cannot use (a driver older
than its CUDA build needs, a CPU-only build) is named with the fix, at --device cuda (an
error, exit 2) and at --device auto (a warning, then the CPU); faked on this GPU-less machine
through the driver's /proc file, nvidia-smi, torch.version.cuda and torch.cuda.is_available."""

from __future__ import annotations

import pytest
import torch
from train_helpers import small_args, small_config

from tsfast.train import cli, runtime
from tsfast.train.loop import train

PROC_TEXT = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.183.01  Release Build  "
             "(dvs-builder@U16-I3-B03-4-3)  Sun May 12 19:39:15 UTC 2024\nGCC version:  gcc 12.3.0\n")


@pytest.fixture
def gpu_here(monkeypatch, tmp_path):
    """A driver 535 GPU that torch cannot see, and a torch built for CUDA 13.0."""
    proc = tmp_path / "version"
    proc.write_text(PROC_TEXT)
    monkeypatch.setattr(runtime, "PROC_DRIVER_VERSION", proc)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return proc


def test_driver_version_from_proc_then_nvidia_smi(gpu_here, monkeypatch, tmp_path):
    assert runtime.nvidia_driver_version() == "535.183.01"
    gpu_here.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\n")
    assert runtime.nvidia_driver_version() == "470.256.02"
    monkeypatch.setattr(runtime, "PROC_DRIVER_VERSION", tmp_path / "missing")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '570.86.15'\necho '570.86.15'\n")
    smi.chmod(0o755)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: str(smi) if name == "nvidia-smi" else None)
    assert runtime.nvidia_driver_version() == "570.86.15"
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert runtime.nvidia_driver_version() is None


def test_old_driver_for_the_cuda_build_names_both_fixes(gpu_here):
    why = runtime.unusable_gpu()
    assert "driver 535.183.01" in why and "CUDA 13.0" in why and "580 or newer" in why
    assert "CUDA 12.x" in why and "README.md" in why


def test_driver_too_old_for_any_supported_build_says_upgrade(gpu_here):
    gpu_here.write_text(PROC_TEXT.replace("535.183.01", "470.256.02"))
    why = runtime.unusable_gpu()
    assert "580 or newer" in why and "CUDA 12.x" not in why and "upgrade the NVIDIA driver" in why


def test_cpu_only_build(gpu_here, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in runtime.unusable_gpu()


def test_new_enough_driver_points_at_visibility(gpu_here, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    why = runtime.unusable_gpu()
    assert "CUDA 12.8" in why and "nvidia-smi" in why and "CUDA_VISIBLE_DEVICES" in why


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_gpus_hidden_on_purpose_or_absent_say_nothing(gpu_here, monkeypatch, hidden, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert runtime.unusable_gpu() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(runtime, "PROC_DRIVER_VERSION", tmp_path / "missing")
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert runtime.unusable_gpu() is None
    assert runtime.auto_device_warning("auto", torch.device("cpu")) is None


def test_device_cuda_is_an_error_with_the_fix(gpu_here, corpus, tmp_path, capsys):
    code = cli.main(small_args(corpus, tmp_path / "out", device="cuda"))
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda" in err and "580 or newer" in err and "CUDA 12.x" in err
    assert not (tmp_path / "out").exists()


def test_device_auto_warns_then_trains_on_the_cpu(gpu_here, corpus, tmp_path, capsys):
    assert "cannot be used by this PyTorch" in " ".join(cli.parse([])[2])
    result = train(small_config(corpus, tmp_path, device="auto", max_iters=1, eval_interval=1))
    err = capsys.readouterr().err
    assert result.exit_code == 0
    assert err.count("warning: an NVIDIA GPU is here") == 1 and "Training on the cpu instead" in err
