"""tsfast.output_layer: the batched decoder's output layer against F.linear, on awkward
sizes, for every row count up to the packed one, after in-place weight updates, and without
MKL's packed GEMM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tsfast import output_layer
from tsfast.output_layer import OutputLayer, packed_gemm_available

V_PADDED, V, C = 1031, 1023, 97  # a padded vocabulary, as GPT's wte is


def reference(h, weight):
    return F.linear(h.double(), weight.double())[:, :V]


@pytest.mark.parametrize("mkl", [True, False], ids=["packed", "plain"])
def test_logits_match_linear_for_every_row_count(mkl, monkeypatch):
    if mkl and not packed_gemm_available():
        pytest.skip("this PyTorch build has no MKL packed GEMM")
    monkeypatch.setattr(output_layer, "packed_gemm_available", lambda: mkl)
    weight = torch.randn(V_PADDED, C)
    layer = OutputLayer(weight, V, rows=5)
    assert layer.packs == mkl
    for B in (1, 2, 3, 5, 4, 1):
        h = torch.randn(B, C)
        logits = layer(h)
        assert logits.shape == (B, V) and logits.dtype == torch.float32
        # float32 GEMMs of different blocking: rounding of a 97-term sum, no more
        torch.testing.assert_close(logits.double(), reference(h, weight), rtol=1e-5, atol=1e-4)
        if not mkl:
            assert torch.equal(logits, F.linear(h, weight)[:, :V])
    with pytest.raises(ValueError, match="6 rows, but the output layer was made for at most 5"):
        layer(torch.randn(6, C))


@pytest.mark.skipif(not packed_gemm_available(), reason="this PyTorch build has no MKL packed GEMM")
def test_an_in_place_weight_update_is_seen():
    weight = torch.nn.Parameter(torch.randn(V_PADDED, C))
    layer = OutputLayer(weight, V, rows=4)
    h = torch.randn(4, C)
    before = layer(h)
    with torch.no_grad():
        weight.mul_(-0.5)  # an optimizer step, or load_state_dict
    after = layer(h)
    torch.testing.assert_close(after.double(), reference(h, weight.detach()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(after, -0.5 * before, rtol=1e-5, atol=1e-4)


def test_single_rows_and_other_dtypes_stay_plain():
    assert not OutputLayer(torch.randn(V_PADDED, C), V, rows=1).packs
    assert not OutputLayer(torch.randn(V_PADDED, C, dtype=torch.bfloat16), V, rows=8).packs
    half = OutputLayer(torch.randn(V_PADDED, C, dtype=torch.float16), V, rows=3)
    h = torch.randn(3, C, dtype=torch.float16)
    assert torch.equal(half(h), F.linear(h, half.weight)[:, :V])
