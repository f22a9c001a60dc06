"""The "dpre" backward of `layernorm_linear`: dPre written once, then two plain GEMMs.

The other backward ("prologue", layernorm_gelu_backward.py) never stores dPre = dY * GELU'(pre):
it recomputes it in the A-tile prologue of both gradient matmuls, once per program along
C, i.e. C / BLOCK_N times per element (6 at gpt2, 3 at baby_gpu), about 20 FP32 and 2
special-function ops each, on the CUDA cores beside the tensor cores. This variant instead:

    1. dPre = dY * GELU'(pre), one elementwise Triton pass (`_dpre_kernel`), written once in
       the weight's dtype; the same pass sums db = sum_rows dPre in fp32 per row group
       (partial sums added in a fixed order: deterministic). Without GELU, dPre is dY itself.
    2. dLN = dPre @ W                  cuBLAS, fp32 output (16-bit operands, fp32 accumulate)
    3. LayerNorm backward: dx, dgamma, dbeta, and LN(x) in the weight's dtype in the same
       pass (x and xhat are in its registers already: LN(x) costs only its store)
    4. dW = dPre^T @ LN(x)             cuBLAS, in the weight's dtype

Why dPre in the weight's dtype, not fp32: the GEMMs take it as a tensor-core operand in
that dtype anyway (the prologue variant rounds it there too, and eager PyTorch's
gelu_backward returns it in that dtype), so fp32 would double the pass's largest write
(2NF -> 4NF bytes, 75 -> 151 MB at gpt2) and both GEMM reads for no accuracy at all; db,
the one consumer that sums it, is taken from the fp32 value before rounding.

Why LN(x) materialised by the LayerNorm backward: dW needs it as a GEMM operand. Recomputing
it in a Triton GEMM's prologue costs F / BLOCK_M (24 at gpt2) recomputations an element
and gives up cuBLAS; materialising it separately would read x again. Written by the pass
that already reads x and computes xhat, it costs one 2NC-byte store (19 MB at gpt2) and
one read by the GEMM; eager PyTorch instead keeps it alive from the forward.

Why cuBLAS (torch.mm) for the GEMMs: they are plain NN / TN products of standard shapes,
exactly the calls eager PyTorch makes, so this variant's GEMMs are as fast as the baseline
it must not lose to, on every GPU, with no autotuning; cuBLAS picks split-K / stream-K for
the long-K dW (K = N, only 144 128x128 output tiles at gpt2, about one wave on 132 SMs), and
TMA + wgmma kernels on H100; an fp32 GEMM follows PyTorch's TF32 setting by construction.

Predicted backward time, bf16, unmeasured (no GPU was available): FLOPs at 75% of the
tensor-core peak (A100 234, H100 740 TFLOP/s), bytes at 85% of HBM (A100-80GB 1.7, H100 SXM
2.8 TB/s), GELU' as 20 FP32 ops + 2 special-function ops on the CUDA cores (A100 9.8, H100
33.5 T instructions/s; BLOCK_N = 128); each kernel the max of its times, kernels added up.
The prologue range: its recomputation fully hidden behind the tensor cores .. not at all.

    shape (N, C, F)            GPU   dpre     prologue        eager torch (same model)
    gpt2 (12288, 768, 3072)    A100  0.68 ms  1.07 .. 1.56 ms  0.70 ms
                               H100  0.27 ms  0.32 .. 0.48 ms  0.28 ms
    baby_gpu (32768, 384, 1536) A100 0.58 ms  0.74 .. 1.07 ms  0.61 ms
                               H100  0.26 ms  0.23 .. 0.34 ms  0.27 ms

dpre's dPre pass is a third of its time at baby_gpu on H100 (bytes), where the prologue's
recomputation is only C / 128 = 3-fold on fast CUDA cores: a toss-up there, which the
measured selection settles; elsewhere dpre should win, by most on A100 (19.5 FP32 TFLOP/s
beside 312 of tensor cores). dpre is eager PyTorch's own sequence, minus its separate db
reduction (one read of dPre) and with LN(x) written in the backward rather than kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tsfast.kernels.layernorm_gelu_backward import _gelu_tanh_grad, column_sum, layer_norm_backward


@triton.jit
def _dpre_kernel(
    DY,  # (N, F) upstream gradient, any dtype and strides (stride 0 after out.sum().backward())
    stride_dy_n, stride_dy_f,
    Pre,  # (N, F) saved pre-activation, contiguous
    DPre,  # (N, F) out: dY * GELU'(pre), contiguous, in its own dtype (the weight's)
    DBPart,  # (P, F) fp32 out: this row group's column sums of dPre (written only when WRITE_DB)
    N, F, rows_per_program,
    WRITE_DB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < F
    db = tl.zeros((BLOCK_F,), dtype=tl.float32)
    first = group.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    for start in range(first, last, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < last)[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy_n + cols[None, :] * stride_dy_f, mask=mask, other=0.0)
        offs = rows[:, None] * F + cols[None, :]
        pre = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
        dpre = dy.to(tl.float32) * _gelu_tanh_grad(pre)  # masked: dy = 0, so dpre = 0
        tl.store(DPre + offs, dpre.to(DPre.dtype.element_ty), mask=mask)
        if WRITE_DB:
            db += tl.sum(dpre, axis=0)
    if WRITE_DB:
        tl.store(DBPart + group * F + cols, db, mask=col_ok)


def dpre_config(n_cols: int) -> dict:
    """Tile of the dPre pass: 16 rows x up to 256 columns over 4 warps, i.e. 32 elements a
    thread per tensor per step (four 128-bit loads in bf16): a streaming pass needs many
    bytes in flight, and no reuse keeps registers low."""
    return {"BLOCK_R": 16, "BLOCK_F": min(256, triton.next_power_of_2(n_cols)), "num_warps": 4}


def dpre_and_bias_grad(dy, pre, *, dpre_dtype: torch.dtype, bias_dtype: torch.dtype | None = None):
    """(dPre, db or None): dPre = dy * GELU'(pre) (N, F) contiguous in `dpre_dtype`, and with
    `bias_dtype` db = sum_rows dPre (summed in fp32). dy (N, F) any strides; pre contiguous."""
    N, F = pre.shape
    cfg = dpre_config(F)
    col_blocks = triton.cdiv(F, cfg["BLOCK_F"])
    # About 8 programs an SM in all: enough bytes in flight, and a small partial-sum buffer.
    sms = torch.cuda.get_device_properties(pre.device).multi_processor_count if pre.is_cuda else 1
    groups = max(1, min(triton.cdiv(N, cfg["BLOCK_R"]), 8 * sms // col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(N, groups), cfg["BLOCK_R"]) * cfg["BLOCK_R"]
    groups = triton.cdiv(N, rows_per_program)
    dpre = torch.empty(N, F, dtype=dpre_dtype, device=pre.device)
    part = torch.empty(groups, F, dtype=torch.float32, device=pre.device) if bias_dtype else None
    _dpre_kernel[(groups, col_blocks)](
        dy, dy.stride(0), dy.stride(1), pre, dpre, dpre if part is None else part,
        N, F, rows_per_program, WRITE_DB=part is not None, **cfg,
    )
    return dpre, None if part is None else column_sum(part, bias_dtype)


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32. fp32 operands: torch.mm, which follows PyTorch's TF32 setting. 16-bit
    ones on CUDA: cuBLAS writes its fp32 accumulator unrounded (out_dtype needs torch 2.8).
    Elsewhere (the interpreter's CPU tensors) that op does not exist: the products of 16-bit
    values are exact in fp32, so upcasting gives the same sums."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def layernorm_linear_backward_dpre(dy, x, mean, rstd, ln_weight, ln_bias, weight, pre, *,
                                   bias=None, input_grads=True, weight_grads=True):
    """(dx, dgamma, dbeta, dW, db) of y = act(LN(x) @ weight^T + bias) by the dPre-once path.

    x (N, C) contiguous with N >= 1, mean and rstd (N,) fp32 from the forward, pre (N, F)
    contiguous or None (no activation), dy (N, F) any strides. Arguments and results as
    `tsfast.kernels.layernorm_gelu.layernorm_linear_backward`, which prepares them.
    """
    cd = weight.dtype  # the GEMMs' operand dtype (under autocast x may be fp32)
    want_db = weight_grads and bias is not None
    if pre is not None:
        dpre, db = dpre_and_bias_grad(dy, pre, dpre_dtype=cd, bias_dtype=bias.dtype if want_db else None)
    else:
        dpre = dy.to(cd)
        db = dpre.sum(0, dtype=torch.float32).to(bias.dtype) if want_db else None
    dx = dgamma = dbeta = dw = ln_out = None
    if input_grads:
        dln = mm_fp32_out(dpre, weight)
        dx, dgamma, dbeta, ln_out = layer_norm_backward(
            x, dln, ln_weight, ln_bias, mean, rstd,
            ln_out_dtype=cd if weight_grads else None,
        )
    if weight_grads:
        if ln_out is None:  # frozen x and LayerNorm (rare): no LayerNorm backward wrote it
            xhat = (x.float() - mean[:, None]) * rstd[:, None]
            ln = xhat * ln_weight.float() if ln_bias is None else torch.addcmul(ln_bias.float(), xhat, ln_weight.float())
            ln_out = ln.to(cd)
        dw = torch.mm(dpre.t(), ln_out)
    return dx, dgamma, dbeta, dw, db
