"""The prototype CPU path for document-masked attention (tsfast/ops/_doc_attention.py): the
oracle's explicit mask and per-token positions in float64 under the 2x rule, and agreement
with the op's current torch path."""

from __future__ import annotations

import random

import pytest
import reference64
import torch
from test_rope_attention_docs import attend, doc_ids_for, inputs

from tsfast import ops
from tsfast.ops import _doc_attention
from tsfast.testing import assert_parity


def prototype(q, k, v, cos, sin, *, causal, doc_ids):
    assert _doc_attention.takes(q, k, doc_ids, causal=causal, dropout_p=0.0)
    return _doc_attention.doc_attention(q, k, v, cos, sin, doc_ids)


def check(B, H, T, D, layout, *, rotary=True, upstream="random", seed=0):
    causal = True
    q, k, v, cos, sin, doc_ids, grad = inputs(B, H, T, T, D, torch.float32, layout, seed)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    cos, sin, doc_ids, grad = cos.cpu(), sin.cpu(), doc_ids.cpu(), grad.cpu()
    if not rotary:
        cos = sin = None
    grad = grad if upstream == "random" else None
    got = attend(prototype, q, k, v, cos, sin, doc_ids, grad, causal=causal)
    same = attend(reference64.rope_attention, q, k, v, cos, sin, doc_ids, grad, causal=causal)
    c64, s64 = (None, None) if cos is None else (cos.double(), sin.double())
    ref = attend(reference64.rope_attention, q, k, v, c64, s64, doc_ids, grad, causal=causal, dtype=torch.float64)
    for name, a, s, r in zip(("o", "dq", "dk", "dv"), got, same, ref, strict=True):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert_parity(f"{name} ({layout}, T={T})", a, s, r, atol=1e-5)
    return got


# Documents of length 1, one document spanning the row (all chunks see all earlier keys),
# rows starting mid-story with several documents a chunk, T = 1, T below one chunk and T not
# a multiple of it.
@pytest.mark.parametrize("B,H,T,D,layout", [
    (1, 1, 1, 16, "whole"),
    (1, 2, 17, 16, "ones"),
    (2, 1, 100, 32, "whole"),
    (2, 2, 100, 32, "short"),
    (3, 1, 257, 64, "mixed"),
])
def test_parity(B, H, T, D, layout):
    check(B, H, T, D, layout, seed=random.randrange(2**31))


@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "learned"])
def test_parity_no_rotary_stride0_upstream(rotary):
    check(2, 2, 140, 16, "mixed", rotary=rotary, upstream="sum", seed=random.randrange(2**31))


def test_chunks_hide_only_keys_no_query_sees():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    docs = doc_ids_for("mixed", 4, 257, gen)
    visible = _doc_attention.visible_mask(docs, torch.float32)[:, 0] == 0  # (B, T, T)
    parts = _doc_attention.chunks(docs, 64)
    assert [(q0, q1) for q0, q1, _ in parts] == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 257)]
    for q0, q1, k0 in parts:
        assert not visible[:, q0:q1, :k0].any() and not visible[:, q0:q1, q1:].any()
        assert visible[:, q0, k0:].any()  # the earliest start is some row's visible key


def test_equals_the_current_torch_path():
    q, k, v, cos, sin, doc_ids, grad = inputs(2, 3, 129, 129, 32, torch.float32, "mixed", random.randrange(2**31))
    q, k, v, cos, sin, doc_ids, grad = (t.cpu() for t in (q, k, v, cos, sin, doc_ids, grad))

    def current(*args, **kw):
        with ops.use("torch"):
            return ops.rope_attention(*args, **kw)

    new = attend(prototype, q, k, v, cos, sin, doc_ids, grad, causal=True)
    old = attend(current, q, k, v, cos, sin, doc_ids, grad, causal=True)
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_takes_only_the_causal_training_shape_in_fp32_on_cpu():
    q = torch.zeros(1, 1, 8, 16)
    docs = doc_ids_for("short", 1, 8, torch.Generator().manual_seed(0))
    assert _doc_attention.takes(q, q, docs, causal=True, dropout_p=0.0)
    assert not _doc_attention.takes(q, q, None, causal=True, dropout_p=0.0)
    assert not _doc_attention.takes(q, q, docs, causal=False, dropout_p=0.0)
    assert not _doc_attention.takes(q.double(), q.double(), docs, causal=True, dropout_p=0.0)
    assert not _doc_attention.takes(q[:, :, 3:], q, docs, causal=True, dropout_p=0.0)  # decoding
    assert not _doc_attention.takes(q, q, docs, causal=True, dropout_p=0.1)


def test_visible_mask_is_causal_and_within_documents():
    docs = torch.tensor([[3, 3, 4, 4, 4], [0, 1, 2, 3, 4]])
    mask = _doc_attention.visible_mask(docs, torch.float32)
    assert mask.shape == (2, 1, 5, 5)
    seen = (docs[:, :, None] == docs[:, None, :]) & torch.ones(5, 5, dtype=torch.bool).tril()
    assert (mask[:, 0][seen] == 0).all() and (mask[:, 0][~seen] == float("-inf")).all()
