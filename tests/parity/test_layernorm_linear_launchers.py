"""Parity of the `layernorm_linear` launchers, forward and each backward variant, with the
float64 oracle, including torch's autocast dtypes (x, gamma, beta fp32; W, b fp16).

The launchers are called directly (the op layer wraps them); every buffer they allocate
starts NaN-poisoned, so an element a kernel forgets to write fails the parity check.
Under TRITON_INTERPRET=1 the sizes are small and awkward (N 1, 17, 100, 257; C 96, 100).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tsfast.testing import assert_parity, device_for_tests, interpreter_ready, poison_

pytestmark = pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready()))

FP32, FP16 = torch.float32, torch.float16
GRAD_NAMES = ("x", "ln_weight", "ln_bias", "weight", "bias")
VARIANTS = ("prologue", "dpre")

# (N, C, F, activation, ln_bias, bias, (dtype of x/gamma/beta, dtype of W/b), upstream)
CASES = [
    (1, 96, 288, "gelu_tanh", True, True, (FP32, FP32), "random"),
    (17, 96, 96, None, True, False, (FP16, FP16), "sum"),
    (100, 96, 384, "gelu_tanh", False, True, (FP16, FP16), "random"),
    (257, 96, 100, "gelu_tanh", True, True, (FP32, FP32), "sum"),
    (100, 100, 50, None, False, True, (FP32, FP32), "random"),
    # autocast: torch runs layer_norm in fp32 and the linear in fp16
    (17, 96, 288, "gelu_tanh", True, True, (FP32, FP16), "random"),
    (100, 96, 96, None, True, True, (FP32, FP16), "sum"),
    (257, 96, 100, "gelu_tanh", False, False, (FP32, FP16), "sum"),
]


def make_inputs(N, C, F_, ln_bias, bias, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    ln_dtype, lin_dtype = dtypes

    def rand(*shape, dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device_for_tests(), dtype=dtype)

    return (
        rand(N, C, dtype=ln_dtype, scale=2.0, shift=0.5),
        rand(C, dtype=ln_dtype, scale=0.2, shift=1.0),
        rand(C, dtype=ln_dtype, scale=0.2) if ln_bias else None,
        rand(F_, C, dtype=lin_dtype, scale=C**-0.5),
        rand(F_, dtype=lin_dtype, scale=0.2) if bias else None,
    )


def torch_layernorm_linear(x, ln_weight, ln_bias, weight, bias, activation):
    """What torch (and its autocast) computes: layer_norm in x's dtype, linear in weight's."""
    ln = F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, 1e-5)
    y = F.linear(ln.to(weight.dtype), weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


def torch_grads(inputs, upstream, activation):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = torch_layernorm_linear(*leaves, activation)
    y.backward(upstream.to(y.dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty / empty_like inside starts as NaN (integers -1)."""
    empty, empty_like = torch.empty, torch.empty_like
    with mock.patch.object(torch, "empty", lambda *a, **k: poison_(empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k))):
        yield


def launch(inputs, upstream, activation, variant, **flags):
    from tsfast.kernels import layernorm_gelu as lng

    x, ln_w, ln_b, w, b = inputs
    with poisoned_allocations():
        y, mean, rstd, pre = lng.layernorm_linear_forward(x, ln_w, ln_b, w, b, activation=activation)
        grads = lng.layernorm_linear_backward(upstream.to(y.dtype), x, mean, rstd, ln_w, ln_b, w, pre,
                                              bias=b, variant=variant, **flags)
    return y, list(grads)


def upstream_for(mode, N, F_, seed):
    if mode == "sum":  # what out.sum().backward() hands over: an expanded view, strides (0, 0)
        up = torch.ones((), dtype=torch.float64).expand(N, F_)
    else:
        up = torch.randn(N, F_, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return up.to(device_for_tests())


def check_case(index, variant):
    N, C, F_, activation, ln_bias, bias, dtypes, mode = CASES[index]
    seed = 500 + index
    inputs = make_inputs(N, C, F_, ln_bias, bias, dtypes, seed)
    upstream = upstream_for(mode, N, F_, seed + 1)
    y, grads = launch(inputs, upstream, activation, variant)
    y_t, grads_t = torch_grads(inputs, upstream, activation)
    y_r, grads_r = torch_grads([None if t is None else t.double() for t in inputs], upstream, activation)
    assert y.dtype == inputs[3].dtype
    assert_parity("y", y, y_t, y_r)
    for name, a, t, r, given in zip(GRAD_NAMES, grads, grads_t, grads_r, inputs, strict=True):
        if given is None:
            assert a is None, f"d{name} returned for an absent input"
            continue
        assert a.dtype == given.dtype, f"d{name} is {a.dtype}, its input {given.dtype}"
        assert_parity(f"d{name}", a, t, r)


def case_id(c):
    N, C, F_, act, ln_bias, bias, (d1, d2), up = c
    return f"N{N}-C{C}-F{F_}-{act}-lnb{int(ln_bias)}-b{int(bias)}-{str(d1)[6:]}x{str(d2)[6:]}-{up}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_parity(index, variant):
    if any(d not in (FP32, FP16) for d in CASES[index][6]):
        pytest.skip("only fp32 and fp16 run under the interpreter")
    check_case(index, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_grads_asked_for(variant):
    """input_grads / weight_grads each alone give the same values as both together."""
    inputs = make_inputs(33, 96, 192, True, True, (FP32, FP16), seed=61)
    up = upstream_for("random", 33, 192, seed=62)
    _, both = launch(inputs, up, "gelu_tanh", variant)
    _, inputs_only = launch(inputs, up, "gelu_tanh", variant, weight_grads=False)
    _, weights_only = launch(inputs, up, "gelu_tanh", variant, input_grads=False)
    assert inputs_only[3:] == [None, None] and weights_only[:3] == [None, None, None]
    for a, b in zip(inputs_only[:3] + weights_only[3:], both, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch(variant):
    inputs = make_inputs(0, 96, 96, True, True, (FP32, FP16), seed=71)
    y, grads = launch(inputs, torch.empty(0, 96, device=device_for_tests()), "gelu_tanh", variant)
    assert y.shape == (0, 96) and grads[0].shape == (0, 96)
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


def test_variants_agree_and_unknown_variant_is_refused():
    from tsfast.kernels import layernorm_gelu as lng

    inputs = make_inputs(40, 96, 96, True, True, (FP32, FP32), seed=81)
    up = upstream_for("random", 40, 96, seed=82)
    _, a = launch(inputs, up, "gelu_tanh", "prologue")
    _, b = launch(inputs, up, "gelu_tanh", "dpre")
    for name, ga, gb in zip(GRAD_NAMES, a, b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5, msg=f"d{name}")
    with pytest.raises(ValueError, match="choose one of"):
        lng.layernorm_linear_backward(up, *inputs[:1], None, None, *inputs[1:4], None, variant="cublas")


def test_autotuner_picks_the_config_list_by_dtypes(monkeypatch):
    """Outside the interpreter: fp32 dot operands get FP32_CONFIGS (TF32) or IEEE_CONFIGS, fp32 x
    with 16-bit W (autocast) FWD_AUTOCAST_CONFIGS, 16-bit both FWD_CONFIGS."""
    from tsfast.kernels import layernorm_gelu as lng
    from tsfast.kernels import layernorm_gelu_backward as lngb

    monkeypatch.delenv("TRITON_INTERPRET")
    tuner = lngb.autotuned(lng._ln_linear_fwd_kernel, lng.FWD_CONFIGS, operand="W",
                           autocast_configs=lng.FWD_AUTOCAST_CONFIGS)
    assert "DOT_PRECISION" in tuner.keys

    def pruned(x_dtype, w_dtype, precision="tf32"):
        args = {"X": torch.empty(1, dtype=x_dtype), "W": torch.empty(1, dtype=w_dtype)}
        chosen = tuner.early_config_prune(tuner.configs, args, DOT_PRECISION=precision)
        return sorted(lngb.config_label(c) for c in chosen)

    def labels(configs):
        return sorted(lngb.config_label(c) for c in configs)

    assert pruned(FP32, FP32) == labels(lngb.FP32_CONFIGS)
    assert pruned(FP32, FP32, "ieee") == labels(lngb.IEEE_CONFIGS)
    assert pruned(FP32, torch.bfloat16) == pruned(FP32, FP16) == labels(lng.FWD_AUTOCAST_CONFIGS)
    assert pruned(FP16, FP16) == pruned(torch.bfloat16, torch.bfloat16) == labels(lng.FWD_CONFIGS)


def test_report_lists_the_fp32_and_autocast_matmuls():
    from tsfast.kernels import layernorm_gelu as lng

    cases = lng.report_cases()
    for case in cases:
        assert list(case["signature"]) == case["fn"].arg_names, case["name"]
    for name in ("ln_linear_fwd", "ln_linear_dln", "ln_linear_dw"):
        for suffix, configs, precision in (("_fp32", lng.FP32_CONFIGS, "tf32"), ("_fp32_ieee", lng.IEEE_CONFIGS, "ieee")):
            fp32 = [c for c in cases if c["name"] == name + suffix and c["shape"] == "gpt2"]
            assert len(fp32) == len(configs)
            assert all(c["constexprs"]["DOT_PRECISION"] == precision for c in fp32)
            assert all(t in ("*fp32", "i32", "fp32", "constexpr") for c in fp32 for t in c["signature"].values())
    autocast = [c for c in cases if c["name"] == "ln_linear_fwd_autocast"]
    assert autocast and all(c["signature"]["X"] == "*fp32" and c["signature"]["W"] == "*bf16" for c in autocast)
    assert {c["name"] for c in cases} >= {"ln_linear_dpre", "ln_linear_dpre_fp32", "ln_linear_ln_bwd_write_ln"}
