"""Parity helpers shared by the test suite and the kernel authors.

The parity rule (from flash-attention's tests, docs/design.md): with `ref` the op in float64,

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


# The child process of `loss_peak_memory`: one forward+backward of the loss, its peak memory.
_LOSS_PEAK_CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from tsfast import ops

mode, n, c, v, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
dtype = torch.float32 if device == "cpu" else torch.bfloat16
gen = torch.Generator().manual_seed(0)
h = torch.randn(n, c, generator=gen).to(device, dtype).requires_grad_()
w = (torch.randn(v, c, generator=gen) * 0.02).to(device, dtype).requires_grad_()
t = torch.randint(0, v, (n,), generator=gen).to(device)
t[::7] = -100
if mode == "full":
    fn = lambda h, w, t, **kw: F.cross_entropy(h @ w.t(), t, **kw)
else:
    ops.use("triton" if mode == "triton" else "torch")
    fn = ops.linear_cross_entropy
if device == "cuda":
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
loss = fn(h, w, t, ignore_index=-100, reduction="mean")
loss.backward()
if device == "cuda":
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
seconds = time.perf_counter() - start
print(json.dumps({"peak_mib": (peak - base) / 2**20, "loss": loss.item(), "seconds": seconds}))
"""


def loss_peak_memory(mode: str, n: int, c: int, v: int, device: str = "cpu") -> dict:
    """Peak memory that one forward+backward of the LM loss adds, in a fresh process.

    mode: "full" (the full-logits oracle), "chunked" (ops.linear_cross_entropy on torch) or
    "triton". On CPU the figure is the growth of peak RSS (ru_maxrss) over what the process
    held once the inputs existed (torch has no CPU allocator statistics; big CPU tensors are
    mmap'd and given back on free, so peak RSS tracks the peak of live tensors); on CUDA it
    is max_memory_allocated above the allocation before. Returns {"peak_mib", "loss", "seconds"}.
    """
    import json
    import subprocess
    import sys

    env = dict(os.environ, TSFAST_KERNELS="torch")
    proc = subprocess.run(
        [sys.executable, "-c", _LOSS_PEAK_CHILD, mode, str(n), str(c), str(v), device],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loss_peak_memory({mode}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
