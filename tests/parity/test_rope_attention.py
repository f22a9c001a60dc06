"""Parity of rope_attention on both backends (tsfast/ops/attention.py, tsfast/kernels/rope_attention.py).

Rule (docs/design.md): |triton - ref64| <= 2 * |torch_same_dtype - ref64| + atol for o, dq, dk, dv,
where ref64 is tests/reference64.py in float64. The Triton path's same-dtype baseline is the
torch path; the torch path's is the plain reference in that dtype. On CPU the kernels run in
Triton's interpreter, so the shape list covers each required T, D, causal/non-causal,
rotary/none and layout at least once rather than their cross product.
"""

from __future__ import annotations

import pytest
import reference64
import torch

from tsfast import ops
from tsfast.testing import (
    ATOL,
    assert_parity,
    device_for_tests,
    interpreter_ready,
    kernel_dtypes,
)

pytestmark = [pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready())),
              pytest.mark.usefixtures("poisoned_attention_outputs")]  # tests/parity/conftest.py


def make_inputs(B, H, T, D, dtype, *, rope, layout, seed):
    """q, k, v as leaf tensors; layout "fused" makes them strided views of one (B, T, 3, H, D)
    projection (as the model's c_attn produces them), "contiguous" makes them (B, H, T, D)."""
    gen = torch.Generator().manual_seed(seed)
    dev = device_for_tests()
    if layout == "fused":
        qkv = torch.randn(B, T, 3, H, D, generator=gen).to(dev, dtype).requires_grad_()
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
        leaves = [qkv]
    else:
        q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dev, dtype).requires_grad_() for _ in range(3))
        leaves = [q, k, v]
    cos, sin = ops.rope_cos_sin(T, D, device=dev) if rope else (None, None)
    grad = torch.randn(B, H, T, D, generator=gen).to(dev, dtype)
    return q, k, v, cos, sin, grad, leaves


def run(backend, q, k, v, cos, sin, grad, *, causal):
    """Output and (dq, dk, dv) of one backend; grad=None backpropagates out.sum()."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with ops.use(backend):
        out = ops.rope_attention(q, k, v, cos, sin, causal=causal)
    (out.sum() if grad is None else out).backward(None if grad is None else grad)
    return out.detach(), q.grad, k.grad, v.grad


def oracle(q, k, v, cos, sin, grad, *, causal):
    """The float64 reference, rotary applied in float64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    c64, s64 = (None, None) if cos is None else (cos.double(), sin.double())
    out = reference64.rope_attention(q64, k64, v64, c64, s64, causal=causal)
    (out.sum() if grad is None else out).backward(None if grad is None else grad.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def plain(q, k, v, cos, sin, grad, *, causal):
    """The plain reference in the inputs' own dtype: the torch path's baseline."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = reference64.rope_attention(q, k, v, cos, sin, causal=causal)
    (out.sum() if grad is None else out).backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def check_parity(B, H, T, D, dtype, *, causal, rope, layout, seed, upstream="random", backend="triton"):
    q, k, v, cos, sin, grad, _ = make_inputs(B, H, T, D, dtype, rope=rope, layout=layout, seed=seed)
    grad = grad if upstream == "random" else None
    got = run(backend, q, k, v, cos, sin, grad, causal=causal)
    if backend == "triton":
        same_dtype = run("torch", q, k, v, cos, sin, grad, causal=causal)
    else:
        same_dtype = plain(q, k, v, cos, sin, grad, causal=causal)
    ref = oracle(q, k, v, cos, sin, grad, causal=causal)
    for name, a, t, r in zip(("o", "dq", "dk", "dv"), got, same_dtype, ref, strict=True):
        assert a.dtype == dtype and a.shape == (B, H, T, D), name
        assert_parity(f"{name} (T={T}, D={D}, causal={causal}, rope={rope}, {layout})", a, t, r, atol=ATOL[dtype])


# (B, H, T, D, causal, rope, layout): every required T and D appears, each with causal and
# non-causal, rotary and none, fused (strided) and contiguous layouts spread across them.
CASES = [
    (1, 2, 1, 32, True, True, "fused"),
    (1, 2, 17, 16, True, True, "fused"),
    (2, 1, 17, 16, False, False, "contiguous"),
    (1, 2, 100, 32, False, True, "fused"),
    (1, 2, 100, 64, True, False, "contiguous"),
    (1, 2, 128, 64, True, True, "fused"),
    (1, 1, 128, 16, False, True, "contiguous"),
    (1, 1, 257, 128, True, True, "fused"),
    (1, 1, 257, 64, False, False, "fused"),
    (1, 1, 512, 64, True, True, "fused"),
    (2, 1, 100, 128, False, True, "contiguous"),
]


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("B,H,T,D,causal,rope,layout", CASES)
def test_parity(B, H, T, D, causal, rope, layout, dtype):
    if T == 512 and dtype == torch.float32 and not torch.cuda.is_available():
        pytest.skip("T=512 runs once under the interpreter (fp16), to bound CPU time")
    check_parity(B, H, T, D, dtype, causal=causal, rope=rope, layout=layout, seed=T * 1000 + D * 10 + causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,T,D,causal,rope,layout", CASES[:8])
def test_torch_path_parity(B, H, T, D, causal, rope, layout, dtype):
    check_parity(B, H, T, D, dtype, causal=causal, rope=rope, layout=layout, seed=T + D, backend="torch")


@pytest.mark.parametrize("causal", [True, False])
def test_backward_of_sum(causal):
    """out.sum() hands the backward a stride-0 gradient: every element must still be right."""
    check_parity(1, 2, 70, 32, torch.float32, causal=causal, rope=True, layout="fused", seed=7, upstream="sum")


def test_backward_bit_identical():
    q, k, v, cos, sin, grad, _ = make_inputs(1, 2, 150, 32, torch.float32, rope=True, layout="fused", seed=11)
    first = run("triton", q, k, v, cos, sin, grad, causal=True)
    second = run("triton", q, k, v, cos, sin, grad, causal=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_gradients_reach_the_fused_projection():
    """q, k, v as views of one qkv tensor: autograd scatters dq, dk, dv back into it."""
    q, k, v, cos, sin, grad, (qkv,) = make_inputs(1, 2, 33, 16, torch.float32, rope=True, layout="fused", seed=3)
    with ops.use("triton"):
        ops.rope_attention(q, k, v, cos, sin).backward(grad)
    _, dq, dk, dv = oracle(q, k, v, cos, sin, grad, causal=True)
    want = torch.stack([g.permute(0, 2, 1, 3) for g in (dq, dk, dv)], dim=2)
    assert torch.allclose(qkv.grad.double(), want, atol=1e-5, rtol=1e-4)


def test_scale_argument():
    q, k, v, cos, sin, grad, _ = make_inputs(1, 1, 40, 32, torch.float32, rope=True, layout="contiguous", seed=5)
    with ops.use("triton"):
        out = ops.rope_attention(q, k, v, cos, sin, causal=False, scale=0.3)
    c64, s64 = cos.double(), sin.double()
    want = reference64.rope_attention(q.double(), k.double(), v.double(), c64, s64, causal=False, scale=0.3)
    assert torch.allclose(out.double(), want, atol=1e-5)


def test_dropout_is_not_taken_by_the_kernel():
    """No in-kernel dropout: an explicit Triton request with dropout must fail loudly."""
    q, k, v, cos, sin, _, _ = make_inputs(1, 1, 8, 16, torch.float32, rope=True, layout="contiguous", seed=1)
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match="dropout"):
        ops.rope_attention(q, k, v, cos, sin, dropout_p=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_preset_shape(causal):
    check_parity(2, 12, 1024, 64, torch.bfloat16, causal=causal, rope=True, layout="fused", seed=13)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_torch_compile_matches_eager():
    q, k, v, cos, sin, grad, _ = make_inputs(2, 4, 300, 64, torch.bfloat16, rope=True, layout="fused", seed=17)

    def attend(q, k, v):
        return ops.rope_attention(q, k, v, cos, sin)

    eager = run("triton", q, k, v, cos, sin, grad, causal=True)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    with ops.use("triton"):
        out = torch.compile(attend, fullgraph=True)(q2, k2, v2)
    out.backward(grad)
    for a, b in zip(eager, (out.detach(), q2.grad, k2.grad, v2.grad), strict=True):
        assert torch.equal(a, b)
