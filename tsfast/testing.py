"""Parity helpers shared by the test suite and the kernel authors.

The parity rule (from flash-attention's tests, DESIGN.md): with `ref` the op in float64,

    |out - ref| <= 2 * |out_torch_same_dtype - ref| + atol        (max over elements)

for outputs and every gradient. The torch result in the same dtype measures how much error
that dtype's arithmetic makes on its own; a kernel may make at most twice as much.
"""

from __future__ import annotations

import os

import torch

# Slack added to the 2x rule, per dtype: covers elements where torch happens to be exact.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device_for_tests() -> torch.device:
    """CUDA when present (kernels run natively), else CPU (kernels run interpreted)."""
    return torch.device("cuda" if on_gpu() else "cpu")


def kernel_dtypes() -> list[torch.dtype]:
    """Dtypes the kernels can be checked in here: Triton's interpreter gets bf16 tl.dot
    wrong (it multiplies raw bit patterns), so bf16 is tested on a GPU only."""
    dtypes = [torch.float32, torch.float16]
    if on_gpu():
        dtypes.append(torch.bfloat16)
    return dtypes


def interpreter_ready() -> str | None:
    """Why Triton kernels cannot be tested here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton does not import: {e}"
    if not on_gpu() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU and TRITON_INTERPRET is not 1"
    return None


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with NaN (integers: -1) so elements a kernel never writes fail a test."""
    return t.fill_(float("nan") if t.is_floating_point() else -1)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(name: str, out: torch.Tensor, out_torch: torch.Tensor, ref: torch.Tensor,
                  atol: float | None = None) -> None:
    """The 2x rule for one tensor: `out` (kernel), `out_torch` (torch, same dtype), `ref`
    (float64). NaN or inf anywhere in `out` where ref is finite fails."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    bad = ~torch.isfinite(out) & finite
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite elements (unwritten?) of {out.numel()}"
    atol = ATOL[out_torch.dtype] if atol is None else atol
    err, base = max_err(out, ref), max_err(out_torch, ref)
    assert err <= 2 * base + atol, (
        f"{name}: max error {err:.3e} > 2 x torch's {base:.3e} + atol {atol:.1e} (dtype {out_torch.dtype})"
    )
