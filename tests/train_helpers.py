"""Shared by the tests/test_train_*.py modules: a small config, the same settings as train.py
flags, and readers of a run's output. The corpus and one_thread fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tsfast.config import TrainConfig, apply_overrides, preset

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "train.py"

SMALL = dict(
    n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, max_iters=6, warmup_iters=2,
    lr=3e-3, min_lr=3e-4, eval_interval=3, eval_iters=2, log_interval=1, sample_at_end=False,
    device="cpu", kernels="torch",
)


def small_config(data: Path, out: Path, **changes) -> TrainConfig:
    values = {**SMALL, "data": data, "out_dir": out, **changes}
    return apply_overrides(preset("tiny"), {k: str(v) for k, v in values.items()})


def small_args(data: Path, out: Path, **changes) -> list[str]:
    values = {**SMALL, "data": data, "out_dir": out, **changes}
    args = ["--config", "tiny"]
    for k, v in values.items():
        args += [f"--{k}", str(v)]
    return args


def read_metrics(out: Path, kind: str = "train") -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8", WANDB_MODE="disabled", **extra)
    return env


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under directory and its bytes (to show nothing was overwritten)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def save_edited(path: Path, ckpt: dict, **changes) -> Path:
    """Save `ckpt` with `changes` and a checksum that matches them: a checkpoint edited by
    someone who knew to reseal it, so that the field checks (not the checksum) must catch it."""
    from tsfast.train.checkpoint import CHECKSUM_KEY, payload_sha256

    edited = {**ckpt, **changes}
    edited[CHECKSUM_KEY] = payload_sha256(edited)
    torch.save(edited, path)
    return Path(path)
