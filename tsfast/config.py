"""Training presets as dataclasses: `tiny`, `baby_cpu`, `baby_gpu`, `gpt2`.

Every field of `TrainConfig` can be overridden from the command line (`--set key=value` or
`--key value`); `apply_overrides` types each value from the dataclass field, rejects unknown
keys and bad values with a message that lists the valid ones.

Parameter counts the presets build (embedding counted once, it is tied to the output layer):

    tiny      2 layers x 128 wide, compact vocabulary  0.53M on the synthetic corpus (965 ids)
    baby_cpu  4 layers x 256 wide, GPT-2 vocabulary    16.0M (12.9M of it the embedding)
    baby_gpu  6 layers x 384 wide, GPT-2 vocabulary    30.0M (19.3M of it the embedding)
    gpt2      12 layers x 768 wide, GPT-2 vocabulary   123.7M (with rotary; 124.5M learned positions)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class ConfigError(ValueError):
    """An unknown preset, an unknown key or a bad value."""


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
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim n_embd/n_head={self.head_dim} must be even (rotary halves)")
        if self.pos not in ("rope", "learned"):
            raise ConfigError(f"pos must be 'rope' or 'learned', got {self.pos!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the output layer's matmul on fast tile sizes.
        return -(-self.vocab_size // 64) * 64


# Fields whose value must be one of a few words.
CHOICES = {
    "pos": ("rope", "learned"),
    "vocab": ("gpt2", "compact"),
    "lr_schedule": ("cosine", "constant"),
    "device": ("auto", "cuda", "mps", "cpu"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "kernels": ("auto", "triton", "torch"),
}
# Fields that must be > 0 (the others that are numbers must be >= 0).
POSITIVE = (
    "n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_iters",
    "eval_interval", "eval_iters", "log_interval", "lr",
)
# Seeds are 64-bit signed integers (what torch.manual_seed and torch.Generator take).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Fields that describe the model's shape: a checkpoint is resumable only if they match.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "pos", "vocab", "doc_mask")


@dataclass
class TrainConfig:
    """Everything `train.py` needs. Model fields mirror GPTConfig (flat, for --key value)."""

    name: str = "tiny"  # the preset this config came from
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos: str = "rope"
    vocab: str = "gpt2"  # "gpt2" (50257 ids) or "compact" (ids seen in the corpus + unknown)
    # Each story attends only to itself, with rotary positions from its own start (doc_ids
    # from the EOT tokens), in training and evaluation. False here: what checkpoints that
    # predate the field were trained with; the presets where it measured no worse turn it on.
    doc_mask: bool = False
    # optimization
    batch_size: int = 32  # micro-batch per process
    grad_accum: int = 1  # micro-steps per optimizer step, summed over all processes
    max_iters: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_schedule: str = "cosine"  # after warmup: "cosine" decay to min_lr, or "constant"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    sample_at_end: bool = True
    # system
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cuda, mps, cpu
    dtype: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 (GradScaler); fp32 on CPU/MPS
    compile: bool = False
    kernels: str = "auto"  # auto, triton, torch
    seed: int = 1337
    data: str = "auto"  # a prepared data dir, or auto (data/tinystories if prepared, else synthetic)
    init_from: str = ""  # start from a Hugging Face model: gpt2[-medium|-large|-xl], OWNER/NAME or a directory
    out_dir: str = "out"
    wandb: bool = False
    wandb_project: str = "tsfast"
    meter: bool = False  # per-kernel TFLOPS lines (tsfast.meter)

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
            block_size=self.block_size, vocab_size=vocab_size, dropout=self.dropout,
            bias=self.bias, pos=self.pos,
        )

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad field; return self."""
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"bad value for {key}: {getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                raise ConfigError(f"bad value for {f.name}: {value}; it must be a finite number")
            if f.name in POSITIVE and not value > 0:
                raise ConfigError(f"bad value for {f.name}: {value}; it must be > 0")
            if not value >= 0 and f.name != "seed":
                raise ConfigError(f"bad value for {f.name}: {value}; it must be >= 0")
        if not SEED_MIN <= self.seed <= SEED_MAX:
            raise ConfigError(f"bad value for seed: {self.seed}; it must be a whole number from {SEED_MIN} to {SEED_MAX}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} is larger than lr={self.lr}; lower min_lr")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1={self.beta1} and beta2={self.beta2} must lie in [0, 1)")
        self.model_config(vocab_size=50257)  # the shape checks of GPTConfig
        return self


PRESETS: dict[str, TrainConfig] = {
    # Writes readable synthetic stories after 400 iterations: about 3 minutes on 2 busy CPU cores.
    "tiny": TrainConfig(
        name="tiny", n_layer=2, n_head=4, n_embd=128, block_size=128, vocab="compact", doc_mask=True,
        batch_size=16, max_iters=400, lr=3e-3, min_lr=3e-4, warmup_iters=30,
        weight_decay=0.0, eval_interval=100, eval_iters=8, log_interval=20,
    ),
    "baby_cpu": TrainConfig(
        name="baby_cpu", n_layer=4, n_head=4, n_embd=256, block_size=512, doc_mask=True,
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
GPU_PRESETS = ("baby_gpu", "gpt2")


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _parse(kind: type, text: str):
    if kind is bool:
        return _parse_bool(text)
    if kind is int:
        value = float(text)  # accepts 5000, 5e3, 5_000
        if value != int(value):
            raise ValueError(f"{text!r} is not a whole number")
        return int(value)
    return kind(text)


def overridable_fields() -> list[str]:
    """Every key `--set` and `--key value` accept (all fields but the preset name)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name != "name"]


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Return a validated copy of cfg with `key=value` strings applied, each typed from
    the dataclass field. Raises ConfigError for an unknown key or a bad value."""
    valid = overridable_fields()
    changes = {}
    for key, text in overrides.items():
        key = key.replace("-", "_")
        if key not in valid:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        kind = type(getattr(cfg, key))
        try:
            changes[key] = _parse(kind, str(text))
        except (ValueError, OverflowError) as e:  # int("inf") overflows
            hint = f"; choose one of {', '.join(CHOICES[key])}" if key in CHOICES else ""
            raise ConfigError(f"bad value for {key}: {text!r} is not a {kind.__name__} ({e}){hint}") from None
    return dataclasses.replace(cfg, **changes).validate()


__all__ = [
    "ConfigError", "GPTConfig", "TrainConfig", "PRESETS", "GPU_PRESETS", "CHOICES",
    "MODEL_FIELDS", "SEED_MIN", "SEED_MAX", "preset", "apply_overrides", "overridable_fields",
]
