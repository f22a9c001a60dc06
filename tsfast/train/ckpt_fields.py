"""Type and range checks of every field tsfast reads from a checkpoint.

A checkpoint that passes its checksum can still hold fields this tsfast cannot use: one
written by hand, or a version-1 file (no checksum) that was damaged. `check_fields` turns
each such field into one CheckpointError naming the file, the field, what it holds and what
was expected, before anything is built from it. Shapes that depend on the model (the
optimizer's moments) are checked where the model exists (`check_optimizer_state`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from tsfast.config import ConfigError, GPTConfig, TrainConfig

FIX = "the file was edited or damaged: use the other checkpoint (ckpt.pt / resume.pt) or train again"
PYTHON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit what is asked of it."""


def _shown(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(path, field: str, value, expected: str) -> CheckpointError:
    return CheckpointError(f"{path}: {field} is {_shown(value)}, expected {expected}; {FIX}")


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _loss(value) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                             and math.isfinite(value) and value >= 0)


def _check_config(config, cls, field: str, path) -> None:
    """A dict whose keys are fields of dataclass `cls`, each of the field's type."""
    if not isinstance(config, dict):
        raise _bad(path, field, config, f"a dict of {cls.__name__} fields")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in config.items():
        if key not in types:
            raise _bad(path, f"{field} key {key!r}", value, f"one of {', '.join(types)} (written by "
                       "another tsfast version?)")
        allowed = PYTHON_TYPES.get(types[key], (object,))
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
            raise _bad(path, f"{field}[{key!r}]", value, f"a {types[key]}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(path, f"{field}[{key!r}]", value, "a finite number")
    try:
        made = cls(**config)
        if isinstance(made, TrainConfig):
            made.validate()
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: {field} does not describe a valid {cls.__name__} ({e}); {FIX}") from None


def _check_model(state, path) -> None:
    if not isinstance(state, dict) or not state:
        raise _bad(path, "model", state, "a non-empty state dict of tensors")
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise _bad(path, f"model[{name!r}]", t, "a floating-point tensor")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: model weight {name} holds NaN or inf values; {FIX}")


def _check_vocab(ckpt: dict, path) -> None:
    from tsfast.data.vocab import CompactVocab

    state, size = ckpt["vocab"], ckpt["model_config"].get("vocab_size", 50257)
    if state is None:
        if size != 50257 or ckpt["train_config"].get("vocab", "gpt2") != "gpt2":
            raise _bad(path, "vocab", state, f"the compact vocabulary map of this {size}-id model")
        return
    try:
        vocab = CompactVocab.from_state_dict(state)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: vocab is not a vocabulary map this tsfast can read ({e}); {FIX}") from None
    if vocab.size != size:
        raise CheckpointError(f"{path}: vocab maps {vocab.size} ids but the model has {size}; {FIX}")


def _check_rng(states, path) -> None:
    if not isinstance(states, list) or not states:
        raise _bad(path, "rng", states, "a non-empty list of random generator states, one per process")
    for i, s in enumerate(states):
        where = f"rng[{i}]"
        if not isinstance(s, dict) or set(s) != {"torch", "cuda", "numpy", "python"}:
            raise _bad(path, where, s, "a dict of torch, cuda, numpy and python states")
        t = s["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise _bad(path, f"{where}['torch']", t, "a uint8 tensor (torch.get_rng_state())")
        if not isinstance(s["cuda"], list) or not all(isinstance(c, torch.Tensor) for c in s["cuda"]):
            raise _bad(path, f"{where}['cuda']", s["cuda"], "a list of uint8 tensors")
        n, p = s["numpy"], s["python"]
        if not (isinstance(n, dict) and isinstance(n.get("kind"), str) and isinstance(n.get("keys"), list)
                and len(n["keys"]) == 624 and all(_whole(k, 0) for k in n["keys"]) and _whole(n.get("pos"), 0)):
            raise _bad(path, f"{where}['numpy']", n, "numpy's MT19937 state (624 keys and a position)")
        if not (isinstance(p, dict) and _whole(p.get("version"), 0) and isinstance(p.get("state"), list | tuple)
                and len(p["state"]) == 625 and all(_whole(k, 0) for k in p["state"])):
            raise _bad(path, f"{where}['python']", p, "Python's random state (625 words)")


def _check_optimizer(state, path) -> None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or not isinstance(groups, list) \
            or not groups or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise _bad(path, "optimizer", state, "an AdamW state dict (state and param_groups)")
    for index, moments in state["state"].items():
        if not isinstance(moments, dict):
            raise _bad(path, f"optimizer state {index!r}", moments, "a dict of tensors")
        for name, t in moments.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: optimizer state {name} of parameter {index} holds NaN or inf; {FIX}")


def check_fields(ckpt: dict, path: str | os.PathLike, *, resume: bool, max_version: int) -> None:
    """Raise CheckpointError for the first field of `ckpt` of the wrong type or range."""
    version = ckpt["format_version"]
    if not _whole(version, 1):
        raise _bad(path, "format_version", version, "a whole number >= 1")
    if version > max_version:
        raise CheckpointError(f"{path} has format version {version}; this tsfast reads up to "
                              f"{max_version}: update tsfast")
    if ckpt.get("kind", "best") not in ("best", "resume"):
        raise _bad(path, "kind", ckpt["kind"], "'best' or 'resume'")
    _check_config(ckpt["model_config"], GPTConfig, "model_config", path)
    _check_config(ckpt["train_config"], TrainConfig, "train_config", path)
    _check_model(ckpt["model"], path)
    _check_vocab(ckpt, path)
    if not _whole(ckpt["step"], 0):
        raise _bad(path, "step", ckpt["step"], "a whole number >= 0")
    for key in ("val_loss", "best_val_loss"):
        if not _loss(ckpt.get(key)):
            raise _bad(path, key, ckpt[key], "None or a finite number >= 0")
    if not _whole(ckpt.get("num_params", 0), 0):
        raise _bad(path, "num_params", ckpt["num_params"], "a whole number >= 0")
    if not resume:
        return
    _check_optimizer(ckpt["optimizer"], path)
    scaler = ckpt["scaler"]
    if not isinstance(scaler, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in scaler.values()
    ):
        raise _bad(path, "scaler", scaler, "a GradScaler state dict of finite numbers (empty without fp16)")
    _check_rng(ckpt["rng"], path)
    if not _whole(ckpt["data_step"], 0):
        raise _bad(path, "data_step", ckpt["data_step"], "a whole number >= 0")
    if not _whole(ckpt.get("world_size", 1), 1):
        raise _bad(path, "world_size", ckpt["world_size"], "a whole number >= 1")
    if not isinstance(ckpt.get("wandb_run_id"), str | None):
        raise _bad(path, "wandb_run_id", ckpt["wandb_run_id"], "None or a string")


def check_optimizer_state(optimizer: torch.optim.Optimizer, path) -> None:
    """After load_state_dict: every moment tensor has its parameter's shape (a mismatch
    would only fail inside the next optimizer step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, t in optimizer.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() and t.shape != p.shape:
                    raise CheckpointError(
                        f"{path}: optimizer state {name} has shape {tuple(t.shape)} for a parameter of "
                        f"shape {tuple(p.shape)}; {FIX}"
                    )
