"""Models from Hugging Face directories and Hub repos, for `--ckpt` and `--init_from`.

A model spec is one of:

    a .pt file, or a directory holding ckpt.pt   a tsfast checkpoint
    a directory holding config.json              a `save_pretrained` directory (GPT-2, or a
                                                 tsfast export), read with safetensors
    gpt2, gpt2-medium, gpt2-large, gpt2-xl       OpenAI's GPT-2 from the Hub
    OWNER/NAME                                   any such model on the Hub

Hub downloads go through `huggingface_hub.snapshot_download` (cached, resumable; offline
with HF_HUB_OFFLINE=1 once cached) and fetch only the config and the safetensors weights.
Every problem is a `CheckpointError` with one line that says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from tsfast.config import GPTConfig, TrainConfig
from tsfast.hf.convert import ConversionError, from_hf_state, has_nonzero_biases, tsfast_config
from tsfast.train.checkpoint import CheckpointError, LoadedModel

GPT2_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
METADATA = "tsfast.json"  # what an export adds for tsfast: name, step, val loss, configs
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
DOWNLOAD = ["config.json", "*.safetensors", INDEX, METADATA]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HF_EXTRA = "the hf extra: `uv run python ...` in a checkout (its environment has every extra) or `pip install 'tinystories-fast[hf]'`"


def is_pretrained_spec(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a Hugging Face model (a directory with config.json, a GPT-2 name
    or a Hub repo id) rather than a tsfast checkpoint file."""
    path = Path(spec)
    if path.is_dir():
        return (path / "config.json").is_file()
    if path.exists() or str(spec).endswith((".pt", ".pth")):
        return False
    first = str(spec).split("/")[0]
    return str(spec) in GPT2_MODELS or (REPO_ID.fullmatch(str(spec)) is not None and not Path(first).is_dir())


def resolve(spec: str | os.PathLike) -> Path:
    """The local directory of a model spec, downloading a Hub repo when it is not one."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory "
                                  "(`save_pretrained` or `python -m tsfast.export` writes one)")
        return path
    repo = GPT2_MODELS.get(str(spec), str(spec))
    if not REPO_ID.fullmatch(repo):
        raise CheckpointError(f"{spec} is neither a directory nor a Hub repo id (OWNER/NAME, or one of "
                              f"{', '.join(GPT2_MODELS)})")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id=repo, allow_patterns=DOWNLOAD))
    except Exception as e:  # RepositoryNotFound, offline, HTTP, disk: one line each
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"cannot download {repo} from the Hugging Face Hub ({type(e).__name__}: {first}); check "
            "the name and the network, or pass a local directory"
        ) from None


def _safetensors():
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"reading a Hugging Face model needs the safetensors package, {HF_EXTRA}") from None
    return load_file


def _read_config(path: Path) -> dict:
    """config.json of a model directory; OSError, or ValueError when it is not a JSON object."""
    config = json.loads((path / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return config


def read_directory(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(config.json, every tensor, tsfast.json or None) of a Hugging Face model directory."""
    load_file = _safetensors()
    try:
        config = _read_config(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a readable config ({e})") from None
    if (path / INDEX).is_file():
        try:
            files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX} is not a readable shard index ({e})") from None
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        others = [p.name for p in path.glob("*.bin")]
        hint = (f" (it has {others[0]}; re-save it with `model.save_pretrained(DIR)`, which writes safetensors)"
                if others else "")
        raise CheckpointError(f"{path} has no {WEIGHTS}{hint}")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(path / name, device="cpu"))
        except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{path / name} is not a readable safetensors file ({type(e).__name__}: {first})") from None
    meta = None
    if (path / METADATA).is_file():
        try:
            meta = json.loads((path / METADATA).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / METADATA} is not readable JSON ({e})") from None
    return config, tensors, meta


def build(path: Path, *, bias: bool | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor], dict | None]:
    """(tsfast config, tsfast state dict, tsfast.json or None) of a model directory.
    bias None: with biases when any is non-zero."""
    config, tensors, meta = read_directory(path)
    if bias is None:
        bias = has_nonzero_biases(tensors)
    try:
        shape = tsfast_config(config, str(path), bias=bias)
        return shape, from_hf_state(tensors, shape, config["model_type"], str(path)), meta
    except ConversionError as e:
        raise CheckpointError(str(e)) from None


def load_pretrained(spec: str | os.PathLike, device: str = "auto") -> LoadedModel:
    """A Hugging Face model (directory, GPT-2 name or Hub repo id) ready for generation."""
    from tsfast.model import GPT
    from tsfast.train.runtime import resolve_device

    path = resolve(spec)
    shape, state, meta = build(path)
    model = GPT(shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model its config describes: {str(e).splitlines()[0]}") from None
    model.to(device=resolve_device(device), dtype=state["wte.weight"].dtype).eval()
    meta = meta if isinstance(meta, dict) else {}
    return LoadedModel(
        model=model, vocab=None, name=str(meta.get("name", spec)), num_params=model.num_params(),
        val_loss=meta.get("val_loss"), step=int(meta.get("step", 0)), config=dict(meta.get("train_config", {})),
    )


def load_model(spec: str | os.PathLike, device: str = "auto") -> LoadedModel:
    """What `sample.py --ckpt` and `demo.py --ckpt` load: a tsfast checkpoint, a directory
    holding one (ckpt.pt), or a Hugging Face model (see the module docstring)."""
    from tsfast.train.checkpoint import load_for_inference

    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        if not (path / "ckpt.pt").is_file():
            raise CheckpointError(f"{path} holds neither config.json (a Hugging Face model) nor ckpt.pt "
                                  "(a tsfast checkpoint): pass one of those, or train first (`uv run train.py`)")
        path = path / "ckpt.pt"
    if is_pretrained_spec(path):
        return load_pretrained(spec, device)
    return load_for_inference(path, device=device)


# ----------------------------------------------------------------------------- --init_from

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "pos", "vocab", "bias")


def plan_init(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, list[str]]:
    """cfg with the model shape of `cfg.init_from` (the rest of the preset kept), and lines
    saying what changed. A shape field the user set (`explicit`) to another value, or a
    context longer than the model's, raises CheckpointError."""
    path = resolve(cfg.init_from)
    try:
        shape = tsfast_config(_read_config(path), str(path), bias=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--init_from {cfg.init_from}: {e}") from None
    if shape.rope_base != GPTConfig.rope_base:
        raise CheckpointError(f"--init_from {cfg.init_from}: rotary base {shape.rope_base}; tsfast trains with "
                              f"{GPTConfig.rope_base} only")
    wanted = dict(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, pos=shape.pos,
                  vocab="gpt2", bias=True)
    clashes = [f"--{k} {getattr(cfg, k)}" for k in SHAPE_FIELDS if k in explicit and getattr(cfg, k) != wanted[k]]
    if clashes:
        raise CheckpointError(
            f"--init_from {cfg.init_from} fixes the model's shape ({', '.join(f'{k}={v}' for k, v in wanted.items())}); "
            f"drop {' and '.join(clashes)}"
        )
    if cfg.block_size > shape.block_size:
        why = "--block_size" if "block_size" in explicit else f"block_size={cfg.block_size} of the {cfg.name} preset"
        raise CheckpointError(f"--init_from {cfg.init_from} has {shape.block_size} positions; {why} needs "
                              f"{cfg.block_size}: pass --block_size {shape.block_size} or less")
    changed = [f"{k} {getattr(cfg, k)} -> {v}" for k, v in wanted.items() if getattr(cfg, k) != v]
    new = dataclasses.replace(cfg, **wanted).validate()
    notes = [f"init_from: {cfg.init_from} ({path}), {shape.n_layer} layers x {shape.n_embd} wide, "
             f"{'learned positions' if shape.pos == 'learned' else 'rotary'}, context {cfg.block_size} "
             f"of its {shape.block_size}"]
    if changed:
        notes.append(f"init_from: the model's shape replaces the preset's: {', '.join(changed)}")
    return new, notes


def init_weights(model: torch.nn.Module, spec: str) -> None:
    """Copy the weights of `spec` (see plan_init) into a tsfast GPT of the same shape."""
    path = resolve(spec)
    _, state, _ = build(path, bias=model.config.bias)
    if model.config.pos == "learned":
        state["wpe.weight"] = state["wpe.weight"][: model.config.block_size]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"--init_from {spec} does not fit the model: {str(e).splitlines()[0]}") from None
