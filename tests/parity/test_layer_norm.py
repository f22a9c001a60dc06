"""Parity of the Triton standalone `layer_norm` (ln_f) with the float64 oracle."""

from __future__ import annotations

import pytest
import reference64
import torch

from tsfast import ops
from tsfast.testing import (
    assert_parity,
    device_for_tests,
    interpreter_ready,
    kernel_dtypes,
    poison_,
)

pytestmark = pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready()))

FP32, FP16 = torch.float32, torch.float16

# (shape of x, bias, dtype, upstream gradient); C = 100 is not a multiple of 16 (no
# alignment to lean on), C = 768 is gpt2's width.
CASES = [
    ((1, 768), True, FP32, "random"),
    ((2, 17, 96), False, FP16, "sum"),
    ((1000, 100), True, FP16, "random"),
    ((257, 384), True, FP32, "sum"),
    ((3, 5, 768), False, FP32, "random"),
]


def make_inputs(shape, bias, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(*shape, generator=g) * 3.0 - 1.0
    weight = torch.randn(C, generator=g) * 0.2 + 1.0
    b = torch.randn(C, generator=g) * 0.2 if bias else None
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, weight, b))


def run(fn, inputs, upstream):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if upstream is None:
        out.sum().backward()
    else:
        out.backward(upstream.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def triton_layer_norm(*args):
    with ops.use("triton"):
        return ops.layer_norm(*args)


def torch_layer_norm(*args):
    with ops.use("torch"):
        return ops.layer_norm(*args)


def case_id(c):
    shape, bias, dtype, grad = c
    return f"{'x'.join(map(str, shape))}-b{int(bias)}-{str(dtype)[6:]}-{grad}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_parity(index):
    shape, bias, dtype, grad_mode = CASES[index]
    if dtype not in kernel_dtypes():
        pytest.skip(f"{dtype} cannot be checked here")
    seed = 2000 + index
    device = device_for_tests()
    inputs = make_inputs(shape, bias, dtype, device, seed)
    upstream = None
    if grad_mode == "random":
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    out, grads = run(triton_layer_norm, inputs, upstream)
    out_t, grads_t = run(torch_layer_norm, inputs, upstream)
    out_r, grads_r = run(reference64.layer_norm, [None if t is None else t.double() for t in inputs], upstream)
    assert_parity("y", out, out_t, out_r)
    for name, a, t, r in zip(("x", "weight", "bias"), grads, grads_t, grads_r, strict=True):
        if r is None:
            assert a is None
            continue
        assert_parity(f"d{name}", a, t, r)


def test_deterministic():
    inputs = make_inputs((150, 96), True, FP32, device_for_tests(), seed=7)
    up = torch.randn(150, 96, generator=torch.Generator().manual_seed(8)).to(device_for_tests())
    first, second = run(triton_layer_norm, inputs, up), run(triton_layer_norm, inputs, up)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


def test_kernels_write_every_element():
    """Kernels launched on NaN-poisoned outputs leave no element unwritten."""
    from tsfast.kernels import layernorm_gelu as lng

    N, C, P = 33, 96, 4
    x, w, b = make_inputs((N, C), True, FP32, device_for_tests(), seed=9)
    y, mean, rstd = (poison_(torch.empty(s, device=x.device)) for s in ((N, C), N, N))
    lng._layer_norm_fwd_kernel[(N,)](x, w, b, y, mean, rstd, C, 1e-5, HAS_BIAS=True, WRITE_Y=True, BLOCK_C=128)
    torch.testing.assert_close(y, torch_layer_norm(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, x.mean(-1))
    dy = torch.randn(N, C, generator=torch.Generator().manual_seed(10)).to(x.device)
    dx, ln_out = poison_(torch.empty_like(x)), poison_(torch.empty(N, C, dtype=torch.float16, device=x.device))
    dgamma_part, dbeta_part = poison_(torch.empty(P, C, device=x.device)), poison_(torch.empty(P, C, device=x.device))
    rows_per_program = -(-N // P)
    lng._layer_norm_bwd_kernel[(P,)](x, dy, w, b, mean, rstd, dx, ln_out, dgamma_part, dbeta_part, N, C,
                                     rows_per_program, HAS_LN_BIAS=True, WRITE_LN=True, BLOCK_C=128)
    for t in (dx, ln_out, dgamma_part, dbeta_part):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(dbeta_part.sum(0), dy.sum(0), rtol=1e-5, atol=1e-5)
    # The LN(x) copy the "dpre" backward feeds its dW GEMM: fp32 math, one rounding to fp16.
    torch.testing.assert_close(ln_out, reference64.layer_norm(x, w, b).half(), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parity_bf16_gpt2_rows():
    inputs = make_inputs((12 * 1024, 768), True, torch.bfloat16, "cuda", seed=3)
    up = torch.randn(12 * 1024, 768, generator=torch.Generator().manual_seed(4), dtype=torch.float64).cuda()
    out, grads = run(triton_layer_norm, inputs, up)
    out_t, grads_t = run(torch_layer_norm, inputs, up)
    out_r, grads_r = run(reference64.layer_norm, [t.double() for t in inputs], up)
    assert_parity("y", out, out_t, out_r)
    for name, a, t, r in zip(("x", "weight", "bias"), grads, grads_t, grads_r, strict=True):
        assert_parity(f"d{name}", a, t, r)
