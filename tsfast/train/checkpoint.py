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
checkpoint whole. `save_checkpoint` first checks the free disk, and turns a failing write
(disk full, permission) into one OutputError line.

Integrity (format version 2): the key `payload_sha256` holds the sha256 of every other key,
tensors by dtype, shape and bytes (`payload_sha256()`). `read_checkpoint`, which --resume,
sample.py and the demo all go through, recomputes it and refuses a file whose contents
changed after it was written; a version-1 file (no checksum) loads with a one-line note.
Then every field is checked by type and range (tsfast.train.ckpt_fields), so an edited or
damaged file is one CheckpointError naming the field, never a traceback later on. Hashing
runs at about 1 GB/s: 0.1 s for a baby_cpu checkpoint's 64 MB of weights.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsfast.config import MODEL_FIELDS, GPTConfig
from tsfast.files import fsync_dir, temp_path
from tsfast.model import GPT
from tsfast.train.ckpt_fields import CheckpointError, check_fields
from tsfast.train.outdir import OutputError, check_free_space

FORMAT_VERSION = 2  # 2: payload_sha256
CHECKSUM_KEY = "payload_sha256"
REQUIRED_KEYS = ("format_version", "model", "model_config", "train_config", "vocab", "step")
RESUME_KEYS = ("optimizer", "scaler", "rng", "data_step")
__all__ = ["CheckpointError", "LoadedModel", "read_checkpoint", "save_checkpoint", "load_for_inference"]


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
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def _to_cpu(obj):
    """The same nested payload with every tensor on the CPU (hashed and saved from there)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _feed(digest, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, list | tuple):  # a tuple may come back a list: the same here
        digest.update(f"L{len(obj)}:".encode())
        for value in obj:
            _feed(digest, value)
    else:  # None, bool, int, float, str: repr is exact and unambiguous with its length
        text = f"{type(obj).__name__}:{obj!r}"
        digest.update(f"S{len(text)}:{text}".encode())


def payload_sha256(state: dict) -> str:
    """sha256 of every key of a checkpoint dict but the checksum itself, in key order."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Seal `state` with its checksum and save it atomically, after checking the free disk.
    A failing write raises OutputError (one line); the previous file at `path` stays."""
    path = Path(path)
    state = _to_cpu(state)
    state[CHECKSUM_KEY] = payload_sha256(state)
    size = _tensor_bytes(state)
    check_free_space(path, size)
    try:
        save_atomic(state, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
        try:
            if shutil.disk_usage(path.parent).free < size:
                reason = f"the disk is full: {reason}"
        except OSError:
            pass
        raise OutputError(
            f"could not write {path} ({reason}); the previous {path.name} is unchanged. Free some "
            "disk space or fix the directory's permissions, then continue with --resume"
        ) from None


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


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def read_checkpoint(path: str | os.PathLike, *, resume: bool = False,
                    note: Callable[[str], None] = _note) -> dict:
    """Load a checkpoint dict onto the CPU, verify its checksum and check every field, or
    raise CheckpointError saying what is wrong and what to do. `note` receives the one line
    about a file too old to carry a checksum (default: printed to stderr)."""
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
    unchecked = _verify_checksum(ckpt, path)
    missing = [k for k in REQUIRED_KEYS + (RESUME_KEYS if resume else ()) if k not in ckpt]
    if missing:
        hint = " (ckpt.pt holds only the model; resume from resume.pt)" if resume and "optimizer" in missing else ""
        raise CheckpointError(f"{path} is not a tsfast {'resume ' if resume else ''}checkpoint: it lacks {', '.join(missing)}{hint}")
    check_fields(ckpt, path, resume=resume, max_version=FORMAT_VERSION)
    if unchecked:
        note(f"{path} was written before tsfast checkpoints carried a checksum: it loads, unverified")
    return ckpt


def _verify_checksum(ckpt: dict, path: Path) -> bool:
    """Raise CheckpointError if the stored checksum does not match; True if there is none
    in a file old enough not to have one."""
    stored = ckpt.get(CHECKSUM_KEY)
    if stored is None:
        version = ckpt.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version >= 2:
            raise CheckpointError(
                f"{path} has format version {version} but lacks its checksum ({CHECKSUM_KEY}): "
                "it was edited or damaged; use the other checkpoint (ckpt.pt / resume.pt) or train again"
            )
        return True
    if stored != payload_sha256(ckpt):
        raise CheckpointError(
            f"{path} is damaged: its contents do not match the checksum stored in it (changed after "
            "it was written: a disk or copy error, or an edit); use the other checkpoint (ckpt.pt / "
            "resume.pt) or train again"
        )
    return False


def model_config_of(ckpt: dict) -> GPTConfig:
    """The model config of a dict from read_checkpoint (which checked that it builds)."""
    return GPTConfig(**ckpt["model_config"])


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
    """The CompactVocab of a dict from read_checkpoint, or None for the full GPT-2 vocabulary."""
    if ckpt["vocab"] is None:
        return None
    from tsfast.data.vocab import CompactVocab

    return CompactVocab.from_state_dict(ckpt["vocab"])


def load_for_inference(path: str | os.PathLike = "out/ckpt.pt", device: str = "auto",
                       note: Callable[[str], None] = _note) -> LoadedModel:
    """The model of a checkpoint, in eval mode on `device` ("auto": CUDA, MPS, then CPU).

    Raises CheckpointError for a missing, corrupt or incompatible file.
    """
    from tsfast.train.runtime import resolve_device

    ckpt = read_checkpoint(path, note=note)
    model = GPT(model_config_of(ckpt))
    load_model_state(model, ckpt, path)
    dtype = ckpt["model"]["wte.weight"].dtype
    model.to(device=resolve_device(device), dtype=dtype).eval()
    vocab = vocab_of(ckpt)  # read_checkpoint checked that it reads
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
