"""Presets build the sizes they advertise; overrides are typed and checked."""

import pytest

from tsfast.config import (
    PRESETS,
    ConfigError,
    GPTConfig,
    apply_overrides,
    overridable_fields,
    preset,
)
from tsfast.model import GPT


def _num_params(cfg, vocab_size=50257, **changes):
    mc = cfg.model_config(vocab_size)
    for k, v in changes.items():
        setattr(mc, k, v)
    return GPT(mc).num_params()


@pytest.mark.parametrize(
    "name, layers, heads, width, context, expected",
    [
        ("baby_cpu", 4, 4, 256, 512, 16_037_376),
        ("baby_gpu", 6, 6, 384, 512, 29_964_288),
        ("gpt2", 12, 12, 768, 1024, 123_689_472),
    ],
)
def test_presets_build_their_advertised_sizes(name, layers, heads, width, context, expected):
    cfg = preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (layers, heads, width, context)
    assert cfg.vocab == "gpt2"
    assert _num_params(cfg) == expected


def test_gpt2_is_124m_with_the_vocab_padded_to_50304():
    cfg = preset("gpt2")
    model = GPT(cfg.model_config(50257))
    assert model.wte.weight.shape == (50304, 768)
    assert model.config.padded_vocab_size == 50304
    assert cfg.batch_size * cfg.grad_accum == 480 and cfg.max_iters == 600_000
    # Rotary has no position table; GPT-2's learned positions add 1024 x 768 (124.5M in all).
    assert 123.5e6 < model.num_params() < 124.6e6
    assert model.num_params() + 1024 * 768 == 124_475_904


def test_baby_presets_match_the_issue():
    cpu, gpu = preset("baby_cpu"), preset("baby_gpu")
    assert (cpu.batch_size, cpu.lr, cpu.max_iters) == (8, 1e-3, 5000)
    assert (gpu.batch_size, gpu.lr, gpu.max_iters, gpu.lr_schedule) == (64, 1e-3, 10000, "cosine")
    assert gpu.compile and not cpu.compile and not preset("tiny").compile


def test_tiny_is_small_and_compact():
    cfg = preset("tiny")
    assert cfg.vocab == "compact"
    assert _num_params(cfg, vocab_size=1000) < 1_000_000


def test_overrides_are_typed_from_the_dataclass():
    cfg = apply_overrides(preset("tiny"), {"lr": "3e-4", "max_iters": "5e3", "compile": "yes", "pos": "learned", "out-dir": "x"})
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.max_iters == 5000 and isinstance(cfg.max_iters, int)
    assert cfg.compile is True and cfg.pos == "learned" and cfg.out_dir == "x"
    assert PRESETS["tiny"].lr != 3e-4  # the preset itself is untouched


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"n_layers": "4"}, ["unknown config key 'n_layers'", "n_layer", "batch_size"]),
        ({"lr": "fast"}, ["bad value for lr", "'fast'"]),
        ({"max_iters": "1.5"}, ["bad value for max_iters"]),
        ({"compile": "maybe"}, ["bad value for compile", "true or false"]),
        ({"device": "tpu"}, ["bad value for device", "auto, cuda, mps, cpu"]),
        ({"batch_size": "0"}, ["batch_size", "> 0"]),
        ({"n_head": "3"}, ["divisible by n_head=3"]),
        ({"min_lr": "1"}, ["min_lr"]),
    ],
)
def test_bad_overrides_name_the_problem(overrides, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(preset("tiny"), overrides)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge': choose one of tiny, baby_cpu, baby_gpu, gpt2"):
        preset("huge")


def test_every_field_but_the_name_is_overridable():
    assert "name" not in overridable_fields()
    assert {"n_layer", "lr", "device", "kernels", "compile", "wandb", "data", "meter"} <= set(overridable_fields())


def test_gpt_config_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="pos must be"):
        GPTConfig(pos="alibi")
    with pytest.raises(ConfigError, match="must be even"):
        GPTConfig(n_embd=12, n_head=4)
