"""Cross-entropy and fused linear cross-entropy (Triton row kernels + cuBLAS matmuls).

Math, for one row of logits x (length V) with target t:

    m = max_j x_j,   s = sum_j exp(x_j - m),   lse = m + ln s
    loss = lse - x_t = (m - x_t) + ln s
    dloss/dx_j = softmax_j - [j == t] = exp(x_j - m - ln s) - [j == t]

The row kernel makes one online pass over V in BLOCK_V blocks, keeping a running max m and
a running sum s rescaled whenever m grows (s <- s * 2^((m_old - m_new) log2 e)); exponents
use exp2 in fp32. m and log2 s are kept apart (not folded into one lse) because at
|x| ~ 1e4 an fp32 lse has an ulp of ~1e-3, which would cost softmax that much relative error.
When a gradient is wanted in the same launch, a second loop over the row (typically served
from L2: the first loop just read it) writes (softmax - onehot) * scale, the target's
"- 1" applied in fp32 before rounding. Rows whose target is `ignore_index` get loss 0 and
gradient 0. Row offsets are int64 (N * V passes 2^31 at the gpt2 shape).

Reductions: "sum" = sum of row losses; "mean" = sum / max(count, 1) with count the number of
non-ignored targets, kept on the device (no .item(): no host sync; all ignored gives 0);
"none" = the row losses. The per-row gradient scale is valid_r * upstream_r * row_scale, with
row_scale = 1/max(count, 1) for "mean" and 1 otherwise.

When is the gradient written in place of the logits? Only into a buffer this module owns:
the fused op's per-chunk logits buffer. The standalone `cross_entropy` gets the caller's
logits, which the caller or another autograd node may still read, so overwriting them would
silently corrupt results. It instead saves the logits and the per-row (m, log2 s) and its
backward writes dlogits into a fresh tensor in one pass (read logits, write dlogits), scaled
by the real upstream gradient, which also makes reduction="none" exact with no extra N x V
multiply. In-place is safe within one program: each element is read and then written by the
same thread, and the second loop starts only after the first loop's last block-reduction.

Fused linear cross-entropy, rows in chunks of R (z = h_c W^T, chunk c):

    forward ("mean"/"sum", gradient wanted):  z = h_c @ W^T into one reused (R, V) buffer;
        row kernel -> loss rows and dz = (softmax - onehot) * row_scale in place of z;
        dh_c = dz @ W;   dW_acc (fp32) += dz^T @ h_c
    backward: dh = dh * g,  dW = dW * g   (g: the scalar upstream gradient)
    reduction "none": the per-row upstream g_r is unknown in forward, and dW = sum_r g_r dz_r^T h_r
        does not factor; so the forward keeps only (m, log2 s) per row and the backward
        recomputes z per chunk, writes dz = (softmax - onehot) * g_r in place, then dh_c, dW.

Precision: the fused op's three GEMMs are cuBLAS calls (torch.mm / addmm), so with fp32
inputs they use TF32 exactly when PyTorch's own matmuls do (its fp32 matmul setting; the rule
Triton dots follow through `tsfast.kernels.precision`); the row kernels have no dot.

Chunk size (`chunk_rows`; unmeasured on a GPU, none was available: the reasoning is FLOP and
byte counts). Per chunk the three GEMMs do 6 R C V FLOPs; the traffic that does not shrink
with R is reading W twice (bf16, 4 V C bytes) and reading+writing the fp32 dW accumulator
(8 V C bytes): intensity 6 R C V / 12 V C = R/2 FLOP/byte, which should sit well above the
H100's ridge (~990 TFLOP/s / 3.35 TB/s ~ 300 FLOP/byte): R >= 2048 gives >= 1024, so this
traffic costs under a third of the GEMM time even with no overlap. The dh GEMM (R x C output)
also needs R C / 128^2 >= ~1 wave of 132 SMs: R >= 2800 at C = 768. Against that, the chunk
buffer is R V elements. Rule: R = 256 MiB of logits / (V * element size), clamped to
[512, 8192] rows, then balanced so chunks are equal and a multiple of 64: gpt2 in bf16
(N=12288, V=50304) gives 5 chunks of at most 2496 rows, a 251 MB buffer, against 1.24 GB for the
full bf16 logits alone (2.5 GB with their gradient).

Static report (bf16, V = 50304, BLOCK_V 4096, 8 warps; triton.compile for sm_80 / sm_90 and
cuobjdump -res-usage / -sass, with the launcher's divisibility-16 hints, see report_cases):
forward 35 / 32 registers, forward+grad 32 / 32, grad 32 / 32; 0 bytes stack and local
(no spills) on both; shared memory 0 (sm_80) and 1 KiB (sm_90, the block reductions).
Every logits load is 128-bit (LDG.E.128, and LDG.E.EF.128 for the evict-first second pass),
every gradient store too (STG.E.128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
CHUNK_BYTES = 256 * 2**20  # target size of the fused op's reused logits buffer
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 512, 8192


@triton.jit
def _row_stats(row_ptr, V, BLOCK_V: tl.constexpr):
    """(m, log2 s) of one row: its max and log2 of sum exp(x - m), one online pass.

    row_ptr: first logit of the row (any float dtype), V contiguous elements.
    """
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # A row that is -inf so far has m_new = -inf: shift by 0 to keep exp2 away from -inf - -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2((m - shift) * LOG2E) + tl.sum(tl.exp2((x - shift) * LOG2E), axis=0)
        m = m_new
    return m, tl.log2(s)


@triton.jit
def _write_row_grad(row_ptr, grad_row_ptr, target, m, log2_sum, scale, V, BLOCK_V: tl.constexpr):
    """grad_j = (softmax_j - [j == target]) * scale for one row; may write over the row itself.

    row_ptr: the row's logits (read); grad_row_ptr: where its gradient goes (may equal row_ptr).
    """
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        p = tl.exp2((x.to(tl.float32) - m) * LOG2E - log2_sum)
        g = (p - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(grad_row_ptr + cols, g.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_forward_kernel(
    logits_ptr,  # (N, V) logits, any float dtype, unit column stride; read
    logits_row_stride,
    grad_ptr,  # (N, V) dlogits out, unit column stride, may alias logits_ptr; WRITE_GRAD only
    grad_row_stride,
    targets_ptr,  # (N,) int32/int64 targets, contiguous
    loss_ptr,  # (N,) fp32 row losses out, 0 at ignored rows
    stats_ptr,  # (N, 2) fp32 out: per row (m, log2 s), for a backward that recomputes softmax
    row_scale_ptr,  # () fp32: gradient weight of a valid row (1/count for "mean"); WRITE_GRAD only
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    m, log2_sum = _row_stats(row_ptr, V, BLOCK_V)
    x_t = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
    loss = (m - x_t) + log2_sum * LN2
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log2_sum)
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(row_scale_ptr), 0.0)
        _write_row_grad(row_ptr, grad_ptr + row * grad_row_stride, target, m, log2_sum, scale, V, BLOCK_V)


@triton.jit
def _ce_grad_kernel(
    logits_ptr,  # (N, V) logits, unit column stride; read
    logits_row_stride,
    grad_ptr,  # (N, V) dlogits out, unit column stride, may alias logits_ptr
    grad_row_stride,
    targets_ptr,  # (N,) int32/int64 targets, contiguous
    stats_ptr,  # (N, 2) fp32 per-row (m, log2 s) from _ce_forward_kernel
    dloss_ptr,  # fp32 upstream gradient: row r at dloss_ptr + r * dloss_stride (stride 0: scalar)
    dloss_stride,
    row_scale_ptr,  # () fp32: 1/count for "mean", else 1
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    upstream = tl.load(dloss_ptr + row * dloss_stride) * tl.load(row_scale_ptr)
    scale = tl.where(valid, upstream, 0.0)  # ignored rows: 0 even if their upstream is NaN
    m = tl.load(stats_ptr + 2 * row)
    log2_sum = tl.load(stats_ptr + 2 * row + 1)
    _write_row_grad(
        logits_ptr + row * logits_row_stride, grad_ptr + row * grad_row_stride,
        target, m, log2_sum, scale, V, BLOCK_V,
    )


# ----------------------------------------------------------------------------- launchers


def row_config(vocab: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for the row kernels.

    A fixed rule rather than autotuning: the in-place launch would be corrupted by the
    autotuner re-running it. 8 KiB of logits per block (4096 bf16 / 2048 fp32) over 8 warps is
    two 128-bit loads per thread per block: enough bytes in flight per SM at 8 resident
    programs, and few enough registers not to spill (see report_cases). Small vocabularies
    take one block of the next power of two, with fewer warps.
    """
    block = min(triton.next_power_of_2(vocab), 8192 // element_size)
    return block, max(1, min(8, block * element_size // 1024))


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(logits, targets, ignore_index, row_scale, loss, stats, grad=None):
    """Fills row losses `loss` (N,) and `stats` (N, 2), fp32; dlogits into `grad` when given."""
    N, V = logits.shape
    if N:
        block, warps = row_config(V, logits.element_size())
        out = logits if grad is None else grad
        _ce_forward_kernel[(N,)](
            logits, logits.stride(0), out, out.stride(0), targets, loss, stats, row_scale,
            V, ignore_index, BLOCK_V=block, WRITE_GRAD=grad is not None, num_warps=warps,
        )


def _launch_grad(logits, grad, targets, stats, dloss, row_scale, ignore_index):
    """grad = (softmax - onehot) * dloss_r * row_scale, rows with ignored targets 0."""
    N, V = logits.shape
    if N:
        block, warps = row_config(V, logits.element_size())
        dloss_stride = dloss.stride(0) if dloss.dim() else 0
        _ce_grad_kernel[(N,)](
            logits, logits.stride(0), grad, grad.stride(0), targets, stats, dloss, dloss_stride,
            row_scale, V, ignore_index, BLOCK_V=block, num_warps=warps,
        )


def _row_scale(targets, ignore_index, reduction):
    """() fp32 device tensor: 1/max(count, 1) for "mean", else 1 (no host sync)."""
    if reduction == "mean":
        count = (targets != ignore_index).sum().clamp_min(1)
        return count.reciprocal().to(torch.float32)
    return torch.ones((), dtype=torch.float32, device=targets.device)


def _reduce(loss_rows, row_scale, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total * row_scale if reduction == "mean" else total


# ----------------------------------------------------------------------------- cross_entropy
# Entry points of this file (here and below) are called by tsfast/ops/losses.py, which
# registers them as torch.library custom ops and validates the arguments first.


def cross_entropy_forward(logits, targets, ignore_index: int, reduction: str):
    """(loss, stats, row_scale): the reduced loss, per-row (m, log2 s) and the row scale,
    the last two kept for `cross_entropy_backward`."""
    logits = _unit_columns(logits)
    targets = targets.contiguous()
    row_scale = _row_scale(targets, ignore_index, reduction)
    N = logits.shape[0]
    loss_rows = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty(N, 2, dtype=torch.float32, device=logits.device)
    _launch_forward(logits, targets, ignore_index, row_scale, loss_rows, stats)
    return _reduce(loss_rows, row_scale, reduction), stats, row_scale


def cross_entropy_backward(grad_out, logits, targets, stats, row_scale, ignore_index: int):
    """dlogits from the saved logits and row statistics, in one pass (read, write)."""
    logits = _unit_columns(logits)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch_grad(logits, grad, targets.contiguous(), stats, grad_out.to(torch.float32), row_scale, ignore_index)
    return grad


# ----------------------------------------------------------------------------- fused linear


def chunk_rows(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk of the fused op (the rule and its reasoning: module docstring)."""
    rows = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (vocab * element_size)))
    if rows >= n_rows:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // rows)
    return min(rows, -(-n_rows // (n_chunks * 64)) * 64)


def _accumulate_dw(acc, dz, hc):
    """acc (fp32) += dz^T @ hc without rounding the chunk's product to 16 bits on CUDA."""
    if acc.dtype == dz.dtype:
        acc.addmm_(dz.t(), hc)
    elif acc.is_cuda:  # cuBLAS: 16-bit inputs, fp32 C read and written in the epilogue
        torch.addmm(acc, dz.t(), hc, out_dtype=torch.float32, out=acc)
    else:  # CPU/interpreter: the fp32-output matmul exists on CUDA only
        acc.add_(dz.t() @ hc)


def _chunked_pass(h, weight, targets, ignore_index, *, row_scale, want_dh, want_dw, dloss=None,
                  stats=None):
    """Run the chunk loop; returns (loss rows, stats, dh, dW fp32).

    Forward mode (dloss None): loss rows and stats, and if a gradient is wanted dz scaled by
    row_scale. Backward mode ("none" reduction): recompute z, dz scaled by dloss_r (stats given).
    """
    N, V = h.shape[0], weight.shape[0]
    rows = chunk_rows(N, V, h.element_size())
    buf = torch.empty(min(rows, N), V, dtype=h.dtype, device=h.device)
    forward = dloss is None
    loss = torch.empty(N, dtype=torch.float32, device=h.device) if forward else None
    stats = torch.empty(N, 2, dtype=torch.float32, device=h.device) if forward else stats
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if want_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_dw else None
    grad = want_dh or want_dw
    for s in range(0, N, rows):
        e = min(s + rows, N)
        hc, tc, z = h[s:e], targets[s:e], buf[: e - s]
        torch.mm(hc, weight.t(), out=z)
        if forward:
            _launch_forward(z, tc, ignore_index, row_scale, loss[s:e], stats[s:e], z if grad else None)
        else:
            _launch_grad(z, z, tc, stats[s:e], dloss[s:e], row_scale, ignore_index)
        if want_dh:
            torch.mm(z, weight, out=dh[s:e])
        if want_dw:
            _accumulate_dw(dw, z, hc)
    return loss, stats, dh, dw


def linear_cross_entropy_forward(h, weight, targets, ignore_index: int, reduction: str, *,
                                 want_dh: bool, want_dw: bool):
    """(loss, stats, row_scale, dh or None, dW fp32 or None).

    "mean"/"sum": the gradients of the loss come out of the same chunk loop (the backward
    only rescales them), and only those asked for are computed. "none": no gradients here
    (the per-row upstream gradient is not known yet); stats and row_scale let
    `linear_cross_entropy_backward` recompute them."""
    targets = targets.contiguous()
    row_scale = _row_scale(targets, ignore_index, reduction)
    in_forward = reduction != "none"
    loss, stats, dh, dw = _chunked_pass(
        h, weight, targets, ignore_index, row_scale=row_scale,
        want_dh=want_dh and in_forward, want_dw=want_dw and in_forward,
    )
    return _reduce(loss, row_scale, reduction), stats, row_scale, dh, dw


def linear_cross_entropy_backward(grad_rows, h, weight, targets, stats, row_scale, ignore_index: int, *,
                                  want_dh: bool, want_dw: bool):
    """(dh or None, dW fp32 or None) of sum_r grad_rows[r] * loss_r (reduction "none")."""
    _, _, dh, dw = _chunked_pass(
        h, weight, targets.contiguous(), ignore_index, row_scale=row_scale,
        want_dh=want_dh, want_dw=want_dw, dloss=grad_rows.to(torch.float32), stats=stats,
    )
    return dh, dw


# ----------------------------------------------------------------------------- static report

# The GPU presets share the padded GPT-2 vocabulary; N and C do not change the row kernels.
_REPORT_VOCAB = {"gpt2": 50304, "baby_gpu": 50304}


def report_cases() -> list[dict]:
    """One compilation per row kernel and launch config, in bf16, at the GPU preset shapes.

    `attrs` gives the divisibility-by-16 hints Triton's launcher derives at run time (16-byte
    aligned torch pointers, row strides and V = 50304 multiples of 16): without them the
    compiled code cannot use 128-bit loads, which the real launches do.
    """
    cases = []
    for shape, vocab in _REPORT_VOCAB.items():
        block, warps = row_config(vocab, 2)
        label = f"BV{block}-w{warps}"
        common = {"num_warps": warps, "num_stages": 3, "config": label, "shape": shape}
        for write_grad in (False, True):
            sig = {"logits_ptr": "*bf16", "logits_row_stride": "i32", "grad_ptr": "*bf16",
                   "grad_row_stride": "i32", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                   "stats_ptr": "*fp32", "row_scale_ptr": "*fp32", "V": "i32",
                   "ignore_index": "i32", "BLOCK_V": "constexpr", "WRITE_GRAD": "constexpr"}
            cases.append({
                "name": "_ce_forward_kernel" + ("_grad" if write_grad else ""),
                "fn": _ce_forward_kernel, "signature": sig,
                "constexprs": {"BLOCK_V": block, "WRITE_GRAD": write_grad},
                "attrs": _aligned(_ce_forward_kernel, sig, ("ignore_index",)), **common,
            })
        sig = {"logits_ptr": "*bf16", "logits_row_stride": "i32", "grad_ptr": "*bf16",
               "grad_row_stride": "i32", "targets_ptr": "*i64", "stats_ptr": "*fp32",
               "dloss_ptr": "*fp32", "dloss_stride": "i32", "row_scale_ptr": "*fp32", "V": "i32",
               "ignore_index": "i32", "BLOCK_V": "constexpr"}
        cases.append({
            "name": "_ce_grad_kernel", "fn": _ce_grad_kernel, "signature": sig,
            "constexprs": {"BLOCK_V": block},
            "attrs": _aligned(_ce_grad_kernel, sig, ("ignore_index", "dloss_stride")), **common,
        })
    return cases


def _aligned(fn, signature, not_aligned) -> dict:
    """{(index,): [["tt.divisibility", 16]]} for every non-constexpr arg except `not_aligned`."""
    return {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, ty in signature.items() if ty != "constexpr" and name not in not_aligned
    }

