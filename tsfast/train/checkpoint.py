"""Checkpoints: atomic writes, the resume state, and loading a model for inference.

Two files in the output directory, both plain dicts that `torch.load(weights_only=True)`
reads (tensors, numbers, strings, lists and dicts only):

    ckpt.pt    the model with the best validation loss so far (sample.py and the demo load it)
    resume.pt  everything `--resume` needs to continue exactly; written every eval and on
               SIGINT/SIGTERM

Keys of both: format_version, kind ("best" or "resume"), model (state dict), model_config,
train_config, vocab (CompactVocab state or None), step, best_val_loss, val_loss, num_params.
train_config's doc_mask (document-masked attention) is part of the model's contract;
checkpoints that predate it have none and read as doc_mask false (`saved_train_config`).
resume.pt adds: optimizer, scaler, rng (torch, cuda, numpy, python), data_step, wandb_run_id.

A write goes to a temporary file in the same directory, is flushed and fsynced, then renamed
over the old file (`os.replace` is atomic), so a crash or kill mid-write leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsfast.config import MODEL_FIELDS, ConfigError, GPTConfig
from tsfast.model import GPT

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "model_config", "train_config", "vocab", "step")
RESUME_KEYS = ("optimizer", "scaler", "rng", "data_step")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit what is asked of it."""


@dataclass
class LoadedModel:
    """A trained model ready for generation."""

    model: GPT  # eval mode, on the requested device, in the checkpoint's dtype
    vocab: Any  # tsfast.data.vocab.CompactVocab, or None for the full GPT-2 vocabulary
    name: str  # preset name
    num_params: int
    val_loss: float | None
    step: int
    config: dict  # the train config it was trained with
    doc_mask: bool = False  # trained (and evaluated) with document-masked attention


# ----------------------------------------------------------------------------- writing


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data itself is synced


def rng_state() -> dict:
    """Every random generator training uses, as weights_only-loadable plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike, *, resume: bool = False) -> dict:
    """Load a checkpoint dict onto the CPU, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        what = "resume checkpoint" if resume else "checkpoint"
        raise CheckpointError(
            f"no {what} at {path}: train first (`uv run train.py` writes out/ckpt.pt and "
            "out/resume.pt), or pass the path of one"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or not a tsfast file): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a tsfast checkpoint dict")
    missing = [k for k in REQUIRED_KEYS + (RESUME_KEYS if resume else ()) if k not in ckpt]
    if missing:
        hint = " (ckpt.pt holds only the model; resume from resume.pt)" if resume and "optimizer" in missing else ""
        raise CheckpointError(f"{path} is not a tsfast {'resume ' if resume else ''}checkpoint: it lacks {', '.join(missing)}{hint}")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {ckpt['format_version']}; this tsfast reads up to "
            f"{FORMAT_VERSION}: update tsfast"
        )
    return ckpt


def model_config_of(ckpt: dict, path: str | os.PathLike = "checkpoint") -> GPTConfig:
    try:
        return GPTConfig(**ckpt["model_config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} has a model config this tsfast cannot build: {e}") from None


def load_model_state(model: torch.nn.Module, ckpt: dict, path: str | os.PathLike = "checkpoint") -> None:
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise CheckpointError(
            f"{path} does not fit the model its config describes: {' '.join(first[:3])}"
        ) from None


def saved_train_config(ckpt: dict) -> dict:
    """The checkpoint's train config, with doc_mask false where it predates that field."""
    return {"doc_mask": False, **ckpt["train_config"]}


def check_same_architecture(ckpt: dict, train_config: dict, path: str | os.PathLike) -> None:
    """Raise CheckpointError if the checkpoint's model shape differs from the config's."""
    saved = saved_train_config(ckpt)
    differ = [k for k in MODEL_FIELDS if saved.get(k) != train_config[k]]
    diffs = [f"{k}={saved.get(k)!r} in the checkpoint, {train_config[k]!r} asked" for k in differ]
    if diffs:
        flags = " ".join(f"--{k} {str(saved.get(k)).lower() if isinstance(saved.get(k), bool) else saved.get(k)}"
                         for k in differ)
        raise CheckpointError(
            f"{path} holds another architecture ({saved.get('name', '?')}): {'; '.join(diffs)}. "
            f"Resume with the same settings (e.g. --config {saved.get('name', '?')} {flags}), or start "
            "fresh without --resume in another --out_dir"
        )


def vocab_of(ckpt: dict):
    """The checkpoint's CompactVocab, or None for the full GPT-2 vocabulary."""
    if ckpt["vocab"] is None:
        return None
    from tsfast.data.vocab import CompactVocab

    return CompactVocab.from_state_dict(ckpt["vocab"])


def load_for_inference(path: str | os.PathLike = "out/ckpt.pt", device: str = "auto") -> LoadedModel:
    """The model of a checkpoint, in eval mode on `device` ("auto": CUDA, MPS, then CPU).

    Raises CheckpointError for a missing, corrupt or incompatible file.
    """
    from tsfast.train.runtime import resolve_device

    ckpt = read_checkpoint(path)
    model = GPT(model_config_of(ckpt, path))
    load_model_state(model, ckpt, path)
    dtype = ckpt["model"]["wte.weight"].dtype
    model.to(device=resolve_device(device), dtype=dtype).eval()
    try:
        vocab = vocab_of(ckpt)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a vocabulary map this tsfast cannot read: {e}") from None
    train_config = saved_train_config(ckpt)
    return LoadedModel(
        model=model,
        vocab=vocab,
        name=str(train_config.get("name", "?")),
        num_params=model.num_params(),
        val_loss=ckpt.get("val_loss"),
        step=int(ckpt["step"]),
        config=train_config,
        doc_mask=bool(train_config["doc_mask"]),
    )
