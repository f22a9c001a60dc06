"""Parity of the Triton `layernorm_linear` (LayerNorm-GELU family) with the float64 oracle
(tests/reference64.py); the same-dtype baseline of the 2x rule is the torch path.

Under TRITON_INTERPRET=1 each required size appears at least once (C in {96, 256, 384, 768},
F in {C, 3C, 4C}, N in {1, 7, 100, 1000}, activation None / gelu_tanh, with and without
each bias, fp32 and fp16) instead of the full cross product: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import reference64
import torch

from tsfast import ops
from tsfast.testing import assert_parity, device_for_tests, interpreter_ready, kernel_dtypes

pytestmark = pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready()))

FP32, FP16 = torch.float32, torch.float16
GRAD_NAMES = ("x", "ln_weight", "ln_bias", "weight", "bias")

# (leading dims of x, C, F, activation, ln_bias, bias, dtype, upstream gradient)
CASES = [
    ((1,), 768, 768, "gelu_tanh", True, True, FP32, "random"),
    ((1, 7), 96, 3 * 96, None, True, False, FP16, "sum"),
    ((4, 25), 384, 384, "gelu_tanh", False, True, FP32, "sum"),
    ((1000,), 96, 3 * 96, "gelu_tanh", True, True, FP16, "random"),
    ((1000,), 96, 96, None, False, False, FP32, "random"),
    ((100,), 256, 4 * 256, None, True, True, FP16, "random"),
    ((3, 7), 100, 50, "gelu_tanh", True, True, FP32, "random"),  # no size a multiple of 16
]


def make_inputs(lead, C, F, ln_bias, bias, dtype, device, seed):
    """Random LayerNorm-linear inputs with a non-zero row mean (as in a residual stream)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    return (
        rand(*lead, C, scale=2.0, shift=0.5),
        rand(C, scale=0.2, shift=1.0),
        rand(C, scale=0.2) if ln_bias else None,
        rand(F, C, scale=C**-0.5),
        rand(F, scale=0.2) if bias else None,
    )


def run(fn, inputs, upstream, **kw):
    """(output, grads) of fn with fresh leaf copies of `inputs`; upstream None means sum()."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kw)
    if upstream is None:
        out.sum().backward()
    else:
        out.backward(upstream.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def triton_layernorm_linear(*args, **kw):
    with ops.use("triton"):
        return ops.layernorm_linear(*args, **kw)


def torch_layernorm_linear(*args, **kw):
    with ops.use("torch"):
        return ops.layernorm_linear(*args, **kw)


def check_parity(inputs, activation, grad_mode, seed):
    kw = dict(activation=activation, eps=1e-5)
    ref64 = [None if t is None else t.double() for t in inputs]
    out_shape = (*inputs[0].shape[:-1], inputs[3].shape[0])
    upstream = None
    if grad_mode == "random":
        g = torch.Generator().manual_seed(seed + 1)
        upstream = torch.randn(out_shape, generator=g, dtype=torch.float64).to(inputs[0].device)
    out, grads = run(triton_layernorm_linear, inputs, upstream, **kw)
    out_t, grads_t = run(torch_layernorm_linear, inputs, upstream, **kw)
    out_r, grads_r = run(reference64.layernorm_linear, ref64, upstream, **kw)
    assert_parity("y", out, out_t, out_r)
    for name, a, t, r in zip(GRAD_NAMES, grads, grads_t, grads_r, strict=True):
        if r is None:
            assert a is None, f"{name} has a gradient but no input"
            continue
        assert_parity(f"d{name}", a, t, r)
    return out, grads


def case_id(c):
    lead, C, F, act, ln_bias, bias, dtype, grad = c
    return f"x{'x'.join(map(str, lead))}-C{C}-F{F}-{act}-lnb{int(ln_bias)}-b{int(bias)}-{str(dtype)[6:]}-{grad}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_parity(index):
    lead, C, F, activation, ln_bias, bias, dtype, grad_mode = CASES[index]
    if dtype not in kernel_dtypes():
        pytest.skip(f"{dtype} cannot be checked here")
    seed = 1000 + index
    inputs = make_inputs(lead, C, F, ln_bias, bias, dtype, device_for_tests(), seed)
    check_parity(inputs, activation, grad_mode, seed)


def test_deterministic():
    """Two runs give bit-identical outputs and gradients (no atomics in the reductions)."""
    inputs = make_inputs((130,), 96, 288, True, True, FP32, device_for_tests(), seed=11)
    up = torch.randn(130, 288, generator=torch.Generator().manual_seed(12)).to(device_for_tests())
    first = run(triton_layernorm_linear, inputs, up, activation="gelu_tanh")
    second = run(triton_layernorm_linear, inputs, up, activation="gelu_tanh")
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(GRAD_NAMES, first[1], second[1], strict=True):
        assert torch.equal(a, b), f"d{name} differs between two runs"


def test_non_contiguous_input_and_frozen_weight():
    """A strided view of x works, and a weight without requires_grad gets no gradient."""
    x_wide, ln_w, ln_b, w, b = make_inputs((40, 2), 96, 96, True, True, FP32, device_for_tests(), seed=21)
    x = x_wide.transpose(1, 2).reshape(40, 192)[:, ::2]  # (40, 96), column stride 2
    assert not x.is_contiguous()
    x_leaf = x.detach().clone().requires_grad_()
    with ops.use("triton"):
        y = ops.layernorm_linear(x_leaf, ln_w, ln_b, w, b, activation="gelu_tanh")
    y.sum().backward()
    x64 = x.double().requires_grad_()
    y64 = reference64.layernorm_linear(x64, ln_w.double(), ln_b.double(), w.double(), b.double(), activation="gelu_tanh")
    y64.sum().backward()
    y_t = torch_layernorm_linear(x, ln_w, ln_b, w, b, activation="gelu_tanh")
    assert_parity("y", y.detach(), y_t, y64.detach())
    assert w.grad is None and x_leaf.grad is not None
    x_t = x.detach().clone().requires_grad_()
    torch_layernorm_linear(x_t, ln_w, ln_b, w, b, activation="gelu_tanh").sum().backward()
    assert_parity("dx", x_leaf.grad, x_t.grad, x64.grad)


def test_empty_batch():
    x, ln_w, ln_b, w, b = make_inputs((0,), 96, 96, True, True, FP32, device_for_tests(), seed=31)
    y, grads = run(triton_layernorm_linear, (x, ln_w, ln_b, w, b), None)
    assert y.shape == (0, 96)
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("F", [3 * 768, 4 * 768])
def test_parity_bf16_gpt2_shape(F):
    inputs = make_inputs((12, 1024), 768, F, True, True, torch.bfloat16, "cuda", seed=F)
    check_parity(inputs, "gelu_tanh" if F == 4 * 768 else None, "random", seed=F)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_compile_over_triton():
    inputs = make_inputs((4, 256), 384, 4 * 384, True, True, torch.bfloat16, "cuda", seed=5)

    def block(x, ln_w, ln_b, w, b):
        return ops.layernorm_linear(x, ln_w, ln_b, w, b, activation="gelu_tanh") * 2.0

    with ops.use("triton"):
        eager = run(block, inputs, None)
        compiled = run(torch.compile(block, fullgraph=True), inputs, None)
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b)


def test_report_cases_describe_every_kernel_and_config():
    """Each case names every kernel argument in order, with a value for every constexpr."""
    from tsfast.kernels import layernorm_gelu as lng
    from tsfast.kernels import layernorm_gelu_backward as lngb

    cases = lng.report_cases()
    for case in cases:
        fn = case["fn"]
        assert list(case["signature"]) == fn.arg_names, case["name"]
        constexprs = {a for a, t in case["signature"].items() if t == "constexpr"}
        assert constexprs == set(case["constexprs"]), case["name"]
        assert case["shape"] in ("gpt2", "baby_gpu")
    per_kernel = {}
    for case in cases:
        per_kernel.setdefault((case["name"], case["shape"]), set()).add(case["config"])
    assert len(per_kernel[("ln_linear_fwd", "gpt2")]) == len(lng.FWD_CONFIGS)
    assert len(per_kernel[("ln_linear_dln", "baby_gpu")]) == len(lngb.DLN_CONFIGS)
    assert len(per_kernel[("ln_linear_dw", "gpt2")]) == len(lngb.DW_CONFIGS)


@pytest.mark.parametrize("backward", ["dpre", "prologue"])
def test_autocast_matches_torch_autocast(backward):
    """Under fp16 autocast (the interpreter computes fp16 dots correctly) the LayerNorm runs
    in fp32 and only the matmul in fp16, as torch's autocast does to F.layer_norm + F.linear:
    y is fp16, every gradient comes back in its input's own dtype (fp32 here), and values
    meet the 2x rule against the float64 oracle with torch's autocast result as baseline."""
    from functools import partial

    from tsfast.ops import layernorm

    dev = device_for_tests()
    inputs = make_inputs((37,), 96, 3 * 96, True, True, FP32, dev, seed=41)
    upstream = torch.randn(37, 3 * 96, generator=torch.Generator().manual_seed(42), dtype=torch.float64).to(dev)
    kernel = partial(layernorm._layernorm_linear_triton, backward=backward)

    def under_autocast(fn):
        def run_it(*args, **kw):
            with torch.autocast(dev.type, dtype=torch.float16):
                return fn(*args, **kw)
        return run_it

    out, grads = run(under_autocast(lambda *a, **kw: kernel(*a, kw["activation"], kw["eps"])), inputs, upstream,
                     activation="gelu_tanh", eps=1e-5)
    out_t, grads_t = run(under_autocast(torch_layernorm_linear), inputs, upstream, activation="gelu_tanh", eps=1e-5)
    out_r, grads_r = run(reference64.layernorm_linear, [t.double() for t in inputs], upstream,
                         activation="gelu_tanh", eps=1e-5)
    assert out.dtype == out_t.dtype == torch.float16
    assert_parity("y", out, out_t, out_r, atol=2e-3)
    for name, a, t, r in zip(GRAD_NAMES, grads, grads_t, grads_r, strict=True):
        assert a.dtype == t.dtype == torch.float32, name
        assert_parity(f"d{name}", a, t, r, atol=2e-3)
