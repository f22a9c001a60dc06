"""`tsfast.kernels.precision.dot_precision`: Triton dots on fp32 follow PyTorch's TF32 setting.

No GPU is needed: the decision reads torch's global flags, which exist in CPU builds too, and
a `torch.device("cuda")` object can be made without a GPU.
"""

from __future__ import annotations

import types

import pytest
import torch

from tsfast.kernels import precision

CUDA = torch.device("cuda")


@pytest.fixture
def clean_tf32_state():
    """Each test starts from torch's default (TF32 off) and leaves it so; "none" clears the
    new API so that the legacy one reads without a mixed-API error afterwards."""
    matmul = torch.backends.cuda.matmul
    torch.set_float32_matmul_precision("highest")
    matmul.fp32_precision = "none"
    yield matmul
    torch.set_float32_matmul_precision("highest")
    matmul.fp32_precision = "none"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_operands_get_the_default(dtype, clean_tf32_state):
    assert precision.dot_precision(dtype, CUDA) == "tf32"
    assert precision.dot_precision(dtype, "cpu") == "tf32"


def test_fp32_default_is_ieee_like_torch(clean_tf32_state):
    assert precision.dot_precision(torch.float32, CUDA) == "ieee"


@pytest.mark.parametrize("allow", [
    lambda m: setattr(m, "fp32_precision", "tf32"),
    lambda m: setattr(m, "allow_tf32", True),
    lambda m: torch.set_float32_matmul_precision("high"),
    lambda m: torch.set_float32_matmul_precision("medium"),
], ids=["fp32_precision", "allow_tf32", "high", "medium"])
def test_fp32_follows_each_way_of_allowing_tf32(allow, clean_tf32_state):
    allow(clean_tf32_state)
    assert precision.dot_precision(torch.float32, CUDA) == "tf32"
    # The interpreter's CPU tensors stay ieee: torch's CPU reference never uses TF32.
    assert precision.dot_precision(torch.float32, "cpu") == "ieee"


def test_read_at_each_call_and_mixed_apis(clean_tf32_state):
    """Switching back and forth, with both APIs mixed (where reading `allow_tf32` raises)."""
    matmul = clean_tf32_state
    torch.set_float32_matmul_precision("high")
    assert precision.dot_precision(torch.float32, CUDA) == "tf32"
    matmul.allow_tf32 = False
    assert precision.dot_precision(torch.float32, CUDA) == "ieee"
    matmul.fp32_precision = "tf32"
    assert precision.dot_precision(torch.float32, CUDA) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert precision.dot_precision(torch.float32, CUDA) == "ieee"


@pytest.mark.parametrize(("allow_tf32", "matmul_precision", "expected"), [
    (False, "highest", "ieee"), (True, "highest", "tf32"), (False, "high", "tf32"), (False, "medium", "tf32"),
])
def test_legacy_api_when_torch_has_no_fp32_precision(monkeypatch, allow_tf32, matmul_precision, expected):
    """Older torch (before fp32_precision): allow_tf32 or a precision other than "highest"."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=allow_tf32))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: matmul_precision)
    assert precision.dot_precision(torch.float32, CUDA) == expected
