"""Every candidate of every op family (tsfast/ops/selection.py: what --kernels auto may
choose on a GPU) against the float64 oracle, by the parity rule of docs/design.md: output
and every gradient within 2x the error of the oracle's plain formulation run in the same
dtype, plus atol. (The per-op files hold the default Triton paths to the stricter baseline
of the torch path.) A candidate added to a family is covered here without a new test.

Inputs are the families' own timing inputs (`bench_inputs`) at awkward sizes. On CPU the
Triton candidates run under the interpreter in fp32 and fp16, the torch ones in fp32 (the
selection happens on CUDA only); on a GPU everything in fp32, fp16 and bf16."""

from __future__ import annotations

import pytest
import reference64
import torch

from tsfast.ops import attention, layernorm, losses
from tsfast.testing import assert_parity, device_for_tests, interpreter_ready, kernel_dtypes, on_gpu

ORACLES = {
    "rope_attention": lambda q, k, v, cos, sin, doc_ids, causal, scale, _p: reference64.rope_attention(
        q, k, v, cos, sin, causal=causal, scale=scale, doc_ids=doc_ids),
    "layernorm_linear": lambda x, lw, lb, w, b, act, eps: reference64.layernorm_linear(
        x, lw, lb, w, b, activation=act, eps=eps),
    "layer_norm": reference64.layer_norm,
    "cross_entropy": lambda logits, t, ii, red: reference64.cross_entropy(logits, t, ignore_index=ii, reduction=red),
    "linear_cross_entropy": lambda h, w, t, ii, red: reference64.linear_cross_entropy(
        h, w, t, ignore_index=ii, reduction=red),
}

# (family, a call of it: its `fields`, the last being grad=True)
CALLS = [
    (attention.FAMILY, (2, 3, 17, 17, 16, True, True, False, None, True)),
    (attention.FAMILY, (1, 2, 100, 100, 32, False, False, False, None, True)),
    (attention.FAMILY, (2, 2, 301, 301, 16, True, True, True, None, True)),  # stories of bench_doc_ids
    (layernorm.LAYERNORM_LINEAR, (17, 96, 288, "gelu_tanh", True, True, None, True)),
    (layernorm.LAYERNORM_LINEAR, (100, 96, 96, None, False, False, None, True)),
    (layernorm.LAYER_NORM, (257, 96, True, None, True)),
    (losses.CROSS_ENTROPY, (100, 257, "mean", None, True)),
    (losses.CROSS_ENTROPY, (17, 1000, "none", None, True)),
    (losses.LINEAR_CROSS_ENTROPY, (17, 64, 1000, "mean", None, True)),
    (losses.LINEAR_CROSS_ENTROPY, (100, 96, 257, "none", None, True)),
    (losses.LINEAR_CROSS_ENTROPY, (5, 64, 50257, "sum", None, True)),
]


def _cases():
    for family, call in CALLS:
        for cand in family.candidates:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                marks = []
                if cand.backend == "triton" and interpreter_ready():
                    marks.append(pytest.mark.skip(reason=str(interpreter_ready())))
                if dtype == torch.bfloat16 or (cand.backend == "torch" and dtype != torch.float32):
                    marks.append(pytest.mark.gpu)  # `pytest -m gpu` (and tsfast.gpucheck) runs these
                if cand.backend == "triton" and dtype not in kernel_dtypes():
                    marks.append(pytest.mark.skip(reason="bf16 runs on a GPU only (the interpreter gets bf16 dots wrong)"))
                if cand.backend == "torch" and dtype != torch.float32 and not on_gpu():
                    # candidates are chosen among on CUDA only; CPU runs fp32 (ATen's CPU
                    # fp16 LayerNorm backward is itself outside the 2x rule)
                    marks.append(pytest.mark.skip(reason="torch candidates in half precision: on a GPU"))
                desc = "-".join(str(v) for v in call[:-1] if v is not None)
                yield pytest.param(family, call, cand.name, dtype, marks=marks,
                                   id=f"{family.op}-{cand.name}-{desc}-{str(dtype)[6:]}")


def _forward(fn, args, wrt_index):
    """fn's output, and the fresh leaf copies of the args at wrt_index it was computed from."""
    args = list(args)
    leaves = []
    for i in wrt_index:
        args[i] = args[i].detach().clone().requires_grad_()
        leaves.append(args[i])
    return fn(*args), leaves


def _backward(out, leaves, upstream):
    """out, detached, and the gradients of (out * upstream).sum() for the leaves."""
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaves)
    return out.detach(), grads


def _run(fn, args, wrt_index, upstream):
    """fn's output and the gradients of (out * upstream).sum() for the args at wrt_index,
    from fresh leaf copies."""
    return _backward(*_forward(fn, args, wrt_index), upstream)


def _float64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("family, call, name, dtype", list(_cases()))
def test_candidate_matches_the_oracle(family, call, name, dtype):
    dev = device_for_tests()
    dname = str(dtype).removeprefix("torch.")
    call = (*call[:-2], dname, call[-1])
    args, wrt = family.bench_inputs(call, dev)
    wrt_index = [i for i, a in enumerate(args) if any(a is w for w in wrt)]
    cand = family.candidate(name)
    oracle = ORACLES[family.op]
    g = torch.Generator(device=dev).manual_seed(1)
    out, leaves = _forward(cand.impl, args, wrt_index)  # upstream takes the output's shape
    upstream = torch.randn(out.shape, generator=g, device=dev, dtype=torch.float64)
    out, grads = _backward(out, leaves, upstream)
    ref, ref_grads = _run(oracle, _float64(args), wrt_index, upstream)
    base, base_grads = _run(oracle, args, wrt_index, upstream)
    with torch.no_grad():  # the torch paths' output dtype does not depend on grad mode
        default_dtype = family.default("torch").impl(*args).dtype
    assert out.dtype == default_dtype, f"{name} returns {out.dtype}, the torch path {default_dtype}"
    assert_parity(f"{family.op}/{name} output", out, base, ref)
    for i, (a, b, r) in enumerate(zip(grads, base_grads, ref_grads, strict=True)):
        assert_parity(f"{family.op}/{name} grad {i}", a, b, r)
