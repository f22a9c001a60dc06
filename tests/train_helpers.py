"""Shared by the tests/test_train_*.py modules: a small prepared corpus, a small config, and
the same settings as train.py flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tsfast.config import TrainConfig, apply_overrides, preset

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "train.py"

SMALL = dict(
    n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, max_iters=6, warmup_iters=2,
    lr=3e-3, min_lr=3e-4, eval_interval=3, eval_iters=2, log_interval=1, sample_at_end=False,
    device="cpu", kernels="torch",
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (600 stories, ~75k tokens), prepared once per session."""
    from tsfast.data.prepare import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("data"), num_stories=600, workers=1, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run best on one thread, and the test machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
