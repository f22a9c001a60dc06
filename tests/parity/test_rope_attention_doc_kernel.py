"""Document-masked attention in the Triton kernels (tsfast/kernels/rope_attention.py), called
through the launchers `_forward` / `_backward` directly.

Oracle: float64 attention with an explicit (B, T, T) mask (same document and, if causal,
s <= t) built here by brute force, and explicit per-token rotary positions (index minus the
index of the document's first token) from tests/reference64.py. Parity rule: |kernel - ref64| <=
2 * |torch_same_dtype - ref64| + atol for o, lse, dq, dk, dv. On CPU the kernels run in
Triton's interpreter with one pinned block config (fwd 64x32, dk/dv 32x64, dq 64x32), so the
layouts below put document boundaries on, just before and just after block edges.
"""

from __future__ import annotations

import math

import pytest
import reference64
import torch
import torch.nn.functional as F

from tsfast.ops.attention import attended_pairs
from tsfast.ops.rotary import apply_rope, rope_cos_sin
from tsfast.testing import (
    ATOL,
    assert_parity,
    device_for_tests,
    interpreter_ready,
    kernel_dtypes,
    on_gpu,
)

pytestmark = [pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready())),
              pytest.mark.usefixtures("poisoned_attention_outputs")]  # tests/parity/conftest.py


def kernels():
    from tsfast.kernels import rope_attention

    return rope_attention


def ids_from_lengths(lengths, first_id=0, step=1):
    """One row of doc ids: document i repeated lengths[i] times, ids first_id, first_id + step, ..."""
    return torch.cat([torch.full((n,), first_id + i * step, dtype=torch.int64) for i, n in enumerate(lengths)])


def oracle_layout(doc_ids, causal):
    """(mask (B, T, T), pos (B, T)); the mask by brute force: same document, earlier-or-equal
    if causal."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = same & torch.ones(T, T, dtype=torch.bool).tril() if causal else same
    return mask, reference64.positions(doc_ids)


def attend(q, k, v, cos, sin, doc_ids, causal, grad, *, dtype_path):
    """(o, lse, dq, dk, dv) of the explicit-mask attention; dtype_path=False computes in float64
    (the oracle), True in q's dtype as the torch backend does (rotation in fp32, SDPA)."""
    mask, pos = oracle_layout(doc_ids.cpu(), causal)
    mask, pos = mask.to(q.device), pos.to(q.device)
    if not dtype_path:
        q, k, v, grad = (t.double() for t in (q, k, v, grad))
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if cos is None:
        qr, kr = q, k
    elif dtype_path:
        c, s = cos[pos][:, None], sin[pos][:, None]
        qr, kr = apply_rope(q, c, s), apply_rope(k, c, s)
    else:
        c, s = cos.double()[pos][:, None], sin.double()[pos][:, None]
        qr, kr = reference64.rotate(q, c, s), reference64.rotate(k, c, s)
    scale = q.shape[-1] ** -0.5
    att = (qr @ kr.transpose(-2, -1) * scale).masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(att, -1)
    if dtype_path:
        o = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask[:, None])
    else:
        o = torch.softmax(att, -1) @ v
    o.backward(grad)
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def make_inputs(B, H, T, D, dtype, *, rope, layout, seed):
    """q, k, v, cos, sin; layout "fused": strided views of one (B, T, 3, H, D) projection."""
    gen = torch.Generator().manual_seed(seed)
    dev = device_for_tests()
    if layout == "fused":
        qkv = torch.randn(B, T, 3, H, D, generator=gen).to(dev, dtype)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    else:
        q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dev, dtype) for _ in range(3))
    cos, sin = rope_cos_sin(T, D, device=dev) if rope else (None, None)
    return q, k, v, cos, sin


def run_kernels(q, k, v, cos, sin, doc_ids, causal, grad):
    ra = kernels()
    o, lse = ra._forward(q, k, v, cos, sin, causal, None, doc_ids)
    dq, dk, dv = ra._backward(grad, q, k, v, cos, sin, o, lse, causal, None, doc_ids)
    B, H, T, _ = q.shape
    return o, (lse * math.log(2)).view(B, H, T), dq, dk, dv  # lse2 (base 2) -> natural log


def check(doc_ids, H, D, dtype, *, causal, rope=True, layout="fused", upstream="random", seed=0):
    B, T = doc_ids.shape
    q, k, v, cos, sin = make_inputs(B, H, T, D, dtype, rope=rope, layout=layout, seed=seed)
    dev = q.device
    if upstream == "sum":  # what out.sum().backward() hands over: an expanded view, stride 0
        grad = torch.ones((), dtype=dtype, device=dev).expand(B, H, T, D)
    else:
        grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed + 1)).to(dev, dtype)
    doc_ids = doc_ids.to(dev)
    got = run_kernels(q, k, v, cos, sin, doc_ids, causal, grad)
    same = attend(q, k, v, cos, sin, doc_ids, causal, grad, dtype_path=True)
    ref = attend(q, k, v, cos, sin, doc_ids, causal, grad, dtype_path=False)
    for name, a, t, r in zip(("o", "lse", "dq", "dk", "dv"), got, same, ref, strict=True):
        assert a.shape == r.shape, name
        assert_parity(f"{name} (T={T}, D={D}, causal={causal}, rope={rope}, {layout})", a, t, r, atol=ATOL[dtype])


def rows(*rows_):
    return torch.stack(rows_)


# (name, doc_ids (B, T), H, D): each awkward layout of the issue at least once.
LAYOUTS = [
    ("T=1", rows(ids_from_lengths([1], first_id=2))),
    ("length-1 docs", rows(ids_from_lengths([1, 1, 3, 1, 5, 1, 1, 4]))),
    ("one doc, T=100", rows(ids_from_lengths([100]))),
    ("mid-story start, gaps in ids", rows(ids_from_lengths([40, 25, 35], first_id=7, step=3))),
    ("many docs per block", rows(ids_from_lengths([3, 5, 2, 7, 1, 9, 4, 6, 30, 2, 11, 20]))),
    ("boundaries at block edges, T=257", rows(ids_from_lengths([63, 1, 64, 65, 31, 33]))),
    ("long docs crossing blocks, T=257", rows(ids_from_lengths([31, 39, 130, 57]))),
    ("B=3, a different layout per row", rows(ids_from_lengths([17, 50, 33]), ids_from_lengths([100], first_id=4),
                                            ids_from_lengths([1] * 20 + [80], first_id=2))),
]


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name,doc_ids", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_doc_mask_parity(name, doc_ids, causal, dtype):
    D = 32 if doc_ids.shape[1] > 128 else 16
    check(doc_ids, 2 if doc_ids.shape[0] == 1 else 1, D, dtype, causal=causal, seed=doc_ids.shape[1])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_doc_mask_without_rotary_contiguous(causal):
    check(rows(ids_from_lengths([10, 1, 39, 50]), ids_from_lengths([64, 36])), 1, 64, torch.float32,
          causal=causal, rope=False, layout="contiguous", seed=3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_doc_mask_backward_of_sum(causal):
    """A stride-0 upstream gradient (out.sum()) must be read correctly on every row."""
    check(rows(ids_from_lengths([30, 2, 38], first_id=1)), 2, 32, torch.float32, causal=causal, upstream="sum",
          seed=5)


@pytest.mark.skipif(on_gpu(), reason="the autotuner may pick different blocks for the two variants on a GPU")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_one_document_is_bit_identical_to_no_doc_ids(causal):
    """With the same blocks, one document per row visits the same key blocks in the same
    order as doc_ids=None, with positions 0..T-1: the results must be equal bit for bit."""
    B, H, T, D = 2, 2, 100, 32
    q, k, v, cos, sin = make_inputs(B, H, T, D, torch.float32, rope=True, layout="fused", seed=9)
    grad = torch.randn(B, H, T, D).to(q.device)
    plain = run_kernels(q, k, v, cos, sin, None, causal, grad)
    one_doc = run_kernels(q, k, v, cos, sin, torch.full((B, T), 3, device=q.device), causal, grad)
    for a, b in zip(plain, one_doc, strict=True):
        assert torch.equal(a, b)


def test_doc_mask_backward_is_deterministic():
    doc_ids = rows(ids_from_lengths([20, 45, 1, 34]))
    q, k, v, cos, sin = make_inputs(1, 2, 100, 16, torch.float32, rope=True, layout="fused", seed=2)
    grad = torch.randn(1, 2, 100, 16).to(q.device)
    first = run_kernels(q, k, v, cos, sin, doc_ids.to(q.device), True, grad)
    second = run_kernels(q, k, v, cos, sin, doc_ids.to(q.device), True, grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_doc_ids_of_the_wrong_shape_are_refused():
    q, k, v, cos, sin = make_inputs(1, 1, 8, 16, torch.float32, rope=True, layout="contiguous", seed=1)
    with pytest.raises(ValueError, match=r"doc_ids must be \(B, T\)"):
        kernels()._forward(q, k, v, cos, sin, True, None, torch.zeros(1, 9, dtype=torch.int64))


@pytest.mark.parametrize("causal", [True, False])
def test_doc_bounds_and_pairs(causal):
    ra = kernels()
    doc_ids = rows(ids_from_lengths([1, 4, 2, 3], first_id=5), ids_from_lengths([10], first_id=0))
    start, end = ra.doc_bounds(doc_ids)
    assert start.dtype == end.dtype == torch.int32
    assert start.tolist() == [[0, 1, 1, 1, 1, 5, 5, 7, 7, 7], [0] * 10]
    assert end.tolist() == [[1, 5, 5, 5, 5, 7, 7, 10, 10, 10], [10] * 10]
    one = ra.doc_bounds(torch.tensor([[4]]))  # T=1: the tables still have one entry per token
    assert [t.tolist() for t in one] == [[[0]], [[1]]]
    mask, _ = oracle_layout(doc_ids, causal)
    pairs = attended_pairs(doc_ids, doc_ids.shape[1], causal)  # the op's FLOP count
    assert pairs == int(mask.sum())
    lengths = [1, 4, 2, 3, 10]
    assert pairs == sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def test_attended_pairs_random_layouts():
    gen = torch.Generator().manual_seed(0)
    doc_ids = torch.randint(0, 3, (4, 57), generator=gen).cumsum(1)  # non-decreasing, repeats and jumps
    for causal in (True, False):
        assert attended_pairs(doc_ids, doc_ids.shape[1], causal) == int(oracle_layout(doc_ids, causal)[0].sum())
