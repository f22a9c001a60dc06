"""One checkpoint trained for a few steps by `train.py`, shared by the sample and demo tests.

Each test module imports the `trained_ckpt` fixture; the checkpoint is trained once per test
session (once per run under pytest-xdist: the workers share a lock and a directory) and
reused from disk after that.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN_ARGS = [
    "--config", "tiny", "--max_iters", "20", "--eval_interval", "10", "--eval_iters", "2",
    "--batch_size", "8", "--log_interval", "10", "--sample_at_end", "false", "--device", "cpu",
]


def quiet_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread (tiny matmuls on a shared machine),
    UTF-8 output, no telemetry."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8", GRADIO_ANALYTICS_ENABLED="False",
        WANDB_MODE="disabled", **extra,
    )
    return env


def _shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def train_checkpoint(out_dir: Path) -> Path:
    ckpt = out_dir / "ckpt.pt"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *TRAIN_ARGS, "--out_dir", str(out_dir)],
        cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and ckpt.is_file(), f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return ckpt


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> Path:
    root = _shared_root(tmp_path_factory)
    out_dir = root / "tsfast-trained-tiny"
    with open(root / "tsfast-trained-tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ckpt = out_dir / "ckpt.pt"
        return ckpt if ckpt.is_file() else train_checkpoint(out_dir)
