"""Which precision Triton's `tl.dot` uses for fp32 operands: the one PyTorch's own matmuls use.

PyTorch runs fp32 matmuls on a GPU's TF32 tensor cores only when the user allows it
(`torch.backends.cuda.matmul.fp32_precision = "tf32"`, or the older
`torch.backends.cuda.matmul.allow_tf32 = True` / `torch.set_float32_matmul_precision("high")`
or `"medium"`); otherwise in full fp32 ("ieee"). Triton's `tl.dot` defaults to TF32 whatever
torch says, so every kernel family passes `dot_precision(...)` as its `DOT_PRECISION`, read at
launch time (the user may change the setting after import), never cached.

The interpreter (`TRITON_INTERPRET=1`, kernels on CPU tensors) always gets "ieee": TF32 is a
GPU tensor-core format, torch's CPU matmuls (the reference the parity tests hold a kernel to)
never use it, torch's setting above speaks for CUDA only, and Triton 3.9's interpreter
computes every dot with numpy in fp32 whatever the precision says, so "ieee" is what runs.

16-bit operands ignore the precision (their products are exact in the fp32 accumulator);
they get "tf32", Triton's default, which compiles to the same code.
"""

from __future__ import annotations

import torch


def torch_allows_tf32() -> bool:
    """True when PyTorch's fp32 matmuls on CUDA may use TF32 (either of its two APIs)."""
    try:
        # torch >= 2.9: always readable, and reports the effective setting whichever API
        # set it ("none" inherits torch.backends.fp32_precision, already resolved here).
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    except AttributeError:  # older torch: only the legacy API exists
        return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def dot_precision(dtype: torch.dtype, device: torch.device | str) -> str:
    """`input_precision` for `tl.dot` on operands of `dtype` in a kernel launched on `device`."""
    if dtype != torch.float32:
        return "tf32"
    if torch.device(device).type != "cuda":
        return "ieee"
    return "tf32" if torch_allows_tf32() else "ieee"
