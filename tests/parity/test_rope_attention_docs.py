"""rope_attention with doc_ids (document masking with per-document rotary positions) on every
backend that takes it, against tests/reference64.py in float64 with an explicit mask and
explicit per-token positions (the 2x rule, docs/design.md)."""

from __future__ import annotations

import pytest
import reference64
import torch

from tsfast import ops
from tsfast.testing import assert_parity, device_for_tests, interpreter_ready


def doc_ids_for(layout: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) non-decreasing ids for a named layout of documents in each row."""
    if layout == "ones":  # every document one token long
        return torch.arange(T).expand(B, T).clone()
    if layout == "whole":  # one document spans the row
        return torch.zeros(B, T, dtype=torch.long)
    rows = []
    for b in range(B):
        mean_len = {"short": 5, "mixed": 23}[layout] + 7 * b  # rows differ
        starts = torch.rand(T, generator=gen) < 1.0 / mean_len
        starts[0] = False
        first = int(torch.randint(0, 50, (), generator=gen))  # a row that starts mid-story
        rows.append(first + starts.long().cumsum(0))
    return torch.stack(rows)


def inputs(B, H, Tq, Tk, D, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    dev = device_for_tests()
    qkv = torch.randn(B, Tk, 3, H, D, generator=gen).to(dev, dtype)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))  # views of a fused projection
    q = q[:, :, Tk - Tq :]
    cos, sin = ops.rope_cos_sin(Tk, D, device=dev)
    doc_ids = doc_ids_for(layout, B, Tk, gen).to(dev)
    grad = torch.randn(B, H, Tq, D, generator=gen).to(dev, dtype)
    return q, k, v, cos, sin, doc_ids, grad


def attend(fn, q, k, v, cos, sin, doc_ids, grad, *, causal, dtype=None):
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, cos, sin, causal=causal, doc_ids=doc_ids)
    (out.sum() if grad is None else out).backward(None if grad is None else grad.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def op_on(backend):
    def fn(*args, **kw):
        with ops.use(backend):
            return ops.rope_attention(*args, **kw)

    return fn


def check(backend, B, H, Tq, Tk, D, dtype, layout, *, causal=True, upstream="random", seed=0):
    q, k, v, cos, sin, doc_ids, grad = inputs(B, H, Tq, Tk, D, dtype, layout, seed)
    grad = grad if upstream == "random" else None
    got = attend(op_on(backend), q, k, v, cos, sin, doc_ids, grad, causal=causal)
    if backend == "triton":
        same = attend(op_on("torch"), q, k, v, cos, sin, doc_ids, grad, causal=causal)
    else:
        same = attend(reference64.rope_attention, q, k, v, cos, sin, doc_ids, grad, causal=causal)
    ref = attend(reference64.rope_attention, q, k, v, cos.double(), sin.double(), doc_ids, grad,
                 causal=causal, dtype=torch.float64)
    for name, a, s, r in zip(("o", "dq", "dk", "dv"), got, same, ref, strict=True):
        assert a.dtype == dtype, name
        # atol: assert_parity's default, tsfast.testing.ATOL[s.dtype], and s.dtype == dtype
        assert_parity(f"{name} ({backend}, {layout}, Tq={Tq}, Tk={Tk})", a, s, r)


# (B, H, Tq, Tk, D, layout): documents of length 1, a document spanning the whole row, rows
# starting mid-story with several documents a block, T not a multiple of any block.
CASES = [
    (1, 2, 17, 17, 16, "ones"),
    (2, 1, 33, 33, 32, "whole"),
    (2, 2, 100, 100, 32, "short"),
    (2, 1, 257, 257, 64, "mixed"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,Tq,Tk,D,layout", CASES)
def test_torch_path(B, H, Tq, Tk, D, layout, dtype):
    check("torch", B, H, Tq, Tk, D, dtype, layout, seed=Tk)


TRITON_READY = interpreter_ready()


@pytest.mark.skipif(TRITON_READY is not None, reason=str(TRITON_READY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,Tq,Tk,D,layout", CASES[:3])
def test_triton_path(B, H, Tq, Tk, D, layout, dtype):
    """The op end to end on the kernel (its own launcher-level tests: test_rope_attention_doc_kernel.py)."""
    check("triton", B, H, Tq, Tk, D, dtype, layout, seed=Tk + 1)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_non_causal_and_stride0_upstream(causal):
    check("torch", 2, 2, 40, 40, 16, torch.float32, "short", causal=causal, upstream="sum", seed=3)


@pytest.mark.parametrize("Tq", [1, 5])
def test_torch_path_decoding_with_left_padding(Tq):
    """Batched decoding's use: queries are the last Tq positions, padding is its own document."""
    check("torch", 3, 2, Tq, 29, 16, torch.float32, "mixed", seed=Tq)


def test_one_document_equals_no_doc_ids():
    q, k, v, cos, sin, _, grad = inputs(2, 2, 50, 50, 32, torch.float32, "whole", seed=9)
    with ops.use("torch"):
        plain = ops.rope_attention(q, k, v, cos, sin)
        masked = ops.rope_attention(q, k, v, cos, sin, doc_ids=torch.full((2, 50), 7, device=q.device))
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-6)


def test_documents_do_not_see_each_other_and_restart_positions():
    """The second story of a row gives the same output as that story alone in its own row."""
    q, k, v, cos, sin, _, _ = inputs(1, 2, 30, 30, 16, torch.float32, "whole", seed=4)
    doc_ids = torch.tensor([[0] * 12 + [1] * 18], device=q.device)
    with ops.use("torch"):
        packed = ops.rope_attention(q, k, v, cos, sin, doc_ids=doc_ids)
        alone = ops.rope_attention(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], cos[:18], sin[:18])
    torch.testing.assert_close(packed[:, :, 12:], alone, rtol=1e-5, atol=1e-6)
