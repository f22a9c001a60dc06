"""Training presets as dataclasses: `tiny`, `baby_cpu`, `baby_gpu`, `gpt2`.

Every field can be overridden from the command line (`--set key=value` or `--key value`);
`apply_overrides` types each value from the dataclass field and rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class GPTConfig:
    """The model's shape: what a checkpoint must match to be loaded."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 512  # context length
    vocab_size: int = 50257  # padded up to a multiple of 64 by the model
    dropout: float = 0.0
    bias: bool = True
    pos: str = "rope"  # "rope" (rotary) or "learned" (GPT-2's position table)
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos not in ("rope", "learned"):
            raise ValueError(f"pos must be 'rope' or 'learned', got {self.pos!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the output layer's matmul on fast tile sizes.
        return -(-self.vocab_size // 64) * 64


@dataclass
class TrainConfig:
    """Everything `train.py` needs. Model fields mirror GPTConfig (flat, for --key value)."""

    name: str = "tiny"
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos: str = "rope"
    vocab: str = "gpt2"  # "gpt2" (50257 ids) or "compact" (ids seen in training + 1 unknown)
    # optimization
    batch_size: int = 32  # micro-batch per process
    grad_accum: int = 1  # micro-steps per optimizer step (across all processes)
    max_iters: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_schedule: str = "cosine"  # "cosine" or "constant" (after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    sample_at_end: bool = True
    # system
    device: str = "auto"  # auto, cuda, mps, cpu
    dtype: str = "auto"  # auto (bf16 on capable GPUs, else fp16 on GPU, fp32 on CPU), float32, bfloat16, float16
    compile: bool = False
    kernels: str = "auto"  # auto, triton, torch
    seed: int = 1337
    data: str = "auto"  # a prepared data dir, or auto (TinyStories if prepared, else synthetic)
    out_dir: str = "out"
    wandb: bool = False
    wandb_project: str = "tsfast"
    meter: bool = False  # per-kernel timing lines (tsfast.meter)

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
            block_size=self.block_size, vocab_size=vocab_size, dropout=self.dropout,
            bias=self.bias, pos=self.pos,
        )


PRESETS: dict[str, TrainConfig] = {
    # Trains to readable synthetic stories in a few minutes on 2 CPU cores.
    "tiny": TrainConfig(
        name="tiny", n_layer=4, n_head=4, n_embd=128, block_size=128, vocab="compact",
        batch_size=32, max_iters=1500, lr=2e-3, min_lr=2e-4, warmup_iters=100,
        eval_interval=250, eval_iters=10, log_interval=50, dropout=0.0,
    ),
    "baby_cpu": TrainConfig(
        name="baby_cpu", n_layer=4, n_head=4, n_embd=256, block_size=512,
        batch_size=8, max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=200,
        lr_schedule="cosine", eval_interval=250, eval_iters=20, log_interval=10,
    ),
    "baby_gpu": TrainConfig(
        name="baby_gpu", n_layer=6, n_head=6, n_embd=384, block_size=512,
        batch_size=64, max_iters=10000, lr=1e-3, min_lr=1e-4, warmup_iters=500,
        lr_schedule="cosine", eval_interval=500, eval_iters=50, log_interval=50, compile=True,
    ),
    # GPT-2 small: micro-batch 12 x 1024 tokens, accumulated to an effective batch of 480.
    "gpt2": TrainConfig(
        name="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024,
        batch_size=12, grad_accum=40, max_iters=600000, lr=6e-4, min_lr=6e-5,
        warmup_iters=2000, lr_schedule="cosine", eval_interval=1000, eval_iters=100,
        log_interval=10, compile=True,
    ),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Return cfg with `key=value` strings applied, each typed from the dataclass field."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, text in overrides.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        kind = type(getattr(cfg, key))
        try:
            value = _parse_bool(text) if kind is bool else kind(text)
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {text!r} is not a {kind.__name__} ({e})") from None
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


__all__ = ["GPTConfig", "TrainConfig", "PRESETS", "preset", "apply_overrides", "config_fields"]
