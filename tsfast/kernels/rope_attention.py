"""Fused rotary embedding + flash attention (FlashAttention-2), forward and backward.

Notation per (batch, head): q, k, v, o: (T, D); R_t is the rotate-half rotation at position t
with the tables c = cos[t], s = sin[t] (D/2 each):

    R x = cat(x1 c - x2 s,  x2 c + x1 s)        x1 = x[:D/2], x2 = x[D/2:]
    R^T y = cat(y1 c + y2 s,  y2 c - y1 s)      (the inverse, used on gradients)

Rotation is applied to q and k tiles as they are loaded (in fp32, then rounded to the input
dtype, as the torch path does), so rotated copies never reach memory. The two halves are
separate tiles, so q_r . k_r = q_r1 . k_r1 + q_r2 . k_r2 is two chained dots.

Forward (one program per query block, online softmax in base 2):
    z = (q_r k_r^T) * scale * log2(e)        pre-scaled, so exp(x) becomes exp2
    m = running row max, l = running sum of exp2(z - m), acc = running sum of exp2(z - m) v
    o = acc / l,  lse2 = m + log2(l)          lse2 saved in fp32 (base-2 log-sum-exp)
Key blocks fully below the causal diagonal run without masks; the diagonal blocks (and the
key tail when not causal) run as a separate masked stage; blocks above the diagonal are
never visited.

Backward, with p = exp2(z - lse2) recomputed from the saved lse2:
    delta = rowsum(dO * o)                    small pre-pass
    dv = p^T dO
    dp = dO v^T,  ds = p * (dp - delta)       (gradient of the natural-scale logits)
    dq_r = scale * ds k_r,  dk_r = scale * ds^T q_r
    dq = R^T dq_r,  dk = R^T dk_r             gradients w.r.t. the un-rotated q and k
One kernel owns a key block and loops over query blocks (dk, dv); another owns a query block
and loops over key blocks (dq). Each output element is written by exactly one program, with
no atomics, so the backward is bit-identical run to run.

Static GPU report (`report_cases()`, bf16, D=64): every config in CONFIGS compiles for sm_80
and sm_90 with 0 spill bytes, HMMA (sm_80) / HGMMA (sm_90) and 128-bit loads; sm_80 uses
168-255 registers a thread (rotated q/k tiles plus fp32 accumulators), sm_90 118-246 (D=128 configs: see CONFIGS).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tsfast.kernels.precision import dot_precision

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
_alloc_output = torch.empty  # every kernel output is allocated through this: tests swap in a NaN-filled one


@triton.jit
def _load_rot(x_ptr, stride_t, rows, T, cos_ptr, sin_ptr, HALF: tl.constexpr, ROPE: tl.constexpr):
    """Rows `rows` of one (T, D) head as two (rows, D/2) halves, rotated when ROPE.

    x_ptr: first element of this head's (T, D) matrix; cos_ptr, sin_ptr: (T, D/2) fp32 tables.
    Rows at or past T load as 0.
    """
    cols = tl.arange(0, HALF)
    in_rows = (rows < T)[:, None]
    ptrs = x_ptr + rows[:, None] * stride_t + cols[None, :]
    x1 = tl.load(ptrs, mask=in_rows, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=in_rows, other=0.0)
    if ROPE:
        table = rows[:, None] * HALF + cols[None, :]
        c = tl.load(cos_ptr + table, mask=in_rows, other=0.0)
        s = tl.load(sin_ptr + table, mask=in_rows, other=0.0)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        x1 = (x1f * c - x2f * s).to(x_ptr.dtype.element_ty)
        x2 = (x2f * c + x1f * s).to(x_ptr.dtype.element_ty)
    return x1, x2


@triton.jit
def _dot_halves(a1, a2, b1, b2, HALF: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a1 @ b1^T + a2 @ b2^T in fp32. 16-bit tensor-core dots need K >= 16, so for D=16
    (halves of 8) the halves go through an fp32 dot: fp16/bf16 values are exact in tf32."""
    if HALF < 16:
        a1 = a1.to(tl.float32)
        a2 = a2.to(tl.float32)
        b1 = b1.to(tl.float32)
        b2 = b2.to(tl.float32)
    acc = tl.dot(a1, tl.trans(b1), input_precision=DOT_PRECISION)
    return tl.dot(a2, tl.trans(b2), acc, input_precision=DOT_PRECISION)


@triton.jit
def _store_unrot(ptr, rows, T, g1, g2, cos_ptr, sin_ptr, HALF: tl.constexpr, ROPE: tl.constexpr):
    """Store fp32 gradient halves of rotated rows as R^T g into a contiguous (T, D) head at ptr."""
    cols = tl.arange(0, HALF)
    in_rows = (rows < T)[:, None]
    if ROPE:
        table = rows[:, None] * HALF + cols[None, :]
        c = tl.load(cos_ptr + table, mask=in_rows, other=0.0)
        s = tl.load(sin_ptr + table, mask=in_rows, other=0.0)
        g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
    ptrs = ptr + rows[:, None] * (2 * HALF) + cols[None, :]
    tl.store(ptrs, g1.to(ptr.dtype.element_ty), mask=in_rows)
    tl.store(ptrs + HALF, g2.to(ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, lo, hi, k_ptr, v_ptr, stride_kt, stride_vt,
               cos_ptr, sin_ptr, T, qk_scale,
               HALF: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               ROPE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASKED applies the causal and tail masks."""
    cols = tl.arange(0, 2 * HALF)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_rot(k_ptr, stride_kt, offs_n, T, cos_ptr, sin_ptr, HALF, ROPE)
        z = _dot_halves(q1, q2, k1, k2, HALF, DOT_PRECISION) * qk_scale
        if MASKED:
            keep = (offs_n < T)[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        p = tl.math.exp2(z - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vt + cols[None, :], mask=(offs_n < T)[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V,  # *(B, H, T, D) inputs, last dim contiguous, other strides free
    COS, SIN,  # *(T, D/2) fp32 rotary tables (not read when ROPE is False)
    OUT,  # *(B, H, T, D) contiguous output
    LSE,  # *(B*H, T) fp32 output: base-2 log-sum-exp of each row's scaled scores
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    H, T, qk_scale,  # qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    q_ptr = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_ptr = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + h * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q1, q2 = _load_rot(q_ptr, stride_qt, offs_m, T, COS, SIN, HALF, ROPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Unmasked stage: whole key blocks below the diagonal (causal) or before the tail.
    if CAUSAL:
        split = start_m  # BLOCK_M % BLOCK_N == 0, so a whole number of key blocks
        masked_hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        split = (T // BLOCK_N) * BLOCK_N
        masked_hi = T
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, 0, split, k_ptr, v_ptr, stride_kt,
                               stride_vt, COS, SIN, T, qk_scale, HALF, BLOCK_N, CAUSAL, ROPE,
                               False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, split, masked_hi, k_ptr, v_ptr,
                               stride_kt, stride_vt, COS, SIN, T, qk_scale, HALF, BLOCK_N, CAUSAL,
                               ROPE, True, DOT_PRECISION)
    in_rows = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=in_rows)
    o = acc / l_i[:, None]
    o_ptrs = OUT + bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=in_rows[:, None])


@triton.jit
def _bwd_delta_kernel(
    OUT,  # *(B*H, T, D) contiguous forward output
    DO,  # *(B, H, T, D) upstream gradient, last dim contiguous, other strides free (even 0)
    DELTA,  # *(B*H, T) fp32 output: rowsum(dO * o)
    stride_dob, stride_doh, stride_dot, H, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    in_rows = offs_m < T
    o = tl.load(OUT + bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + cols[None, :],
                mask=in_rows[:, None], other=0.0)
    do_ptr = DO + (bh // H).to(tl.int64) * stride_dob + (bh % H) * stride_doh
    do = tl.load(do_ptr + offs_m[:, None] * stride_dot + cols[None, :], mask=in_rows[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=in_rows)


@triton.jit
def _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, lo, hi, q_ptr, do_ptr, stride_qt, stride_dot,
                lse_ptr, delta_ptr, cos_ptr, sin_ptr, T, qk_scale,
                HALF: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                ROPE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk_r (two halves) and dv of one key block over query blocks [lo, hi)."""
    cols = tl.arange(0, 2 * HALF)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_rows = offs_m < T
        q1, q2 = _load_rot(q_ptr, stride_qt, offs_m, T, cos_ptr, sin_ptr, HALF, ROPE)
        do = tl.load(do_ptr + offs_m[:, None] * stride_dot + cols[None, :], mask=in_rows[:, None], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=in_rows, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=in_rows, other=0.0)
        zT = _dot_halves(k1, k2, q1, q2, HALF, DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(zT - lse[None, :])
        if MASKED:
            keep = in_rows[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PRECISION)
        dk2 = tl.dot(dsT, q2, dk2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V,  # *(B, H, T, D) forward inputs, last dim contiguous
    COS, SIN,  # *(T, D/2) fp32 rotary tables (not read when ROPE is False)
    DO,  # *(B, H, T, D) upstream gradient, last dim contiguous
    LSE, DELTA,  # *(B*H, T) fp32: forward lse2 and rowsum(dO * o)
    DK, DV,  # *(B, H, T, D) contiguous outputs
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    q_ptr = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    do_ptr = DO + b.to(tl.int64) * stride_dob + h * stride_doh
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = DELTA + bh.to(tl.int64) * T
    offs_n = start_n + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    k1, k2 = _load_rot(K + b.to(tl.int64) * stride_kb + h * stride_kh, stride_kt, offs_n, T, COS, SIN, HALF, ROPE)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + cols[None, :],
                mask=(offs_n < T)[:, None], other=0.0)
    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Stages: the diagonal (causal only, masked), whole query blocks (unmasked), the tail (masked).
    full_hi = (T // BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag_hi = tl.minimum(start_n + BLOCK_N, T)  # BLOCK_N % BLOCK_M == 0
        dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, start_n, diag_hi, q_ptr, do_ptr,
                                   stride_qt, stride_dot, lse_ptr, delta_ptr, COS, SIN, T, qk_scale,
                                   HALF, BLOCK_M, CAUSAL, ROPE, True, DOT_PRECISION)
        mid_lo = start_n + BLOCK_N
    else:
        mid_lo = 0
    mid_hi = tl.maximum(mid_lo, full_hi)
    dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, mid_lo, mid_hi, q_ptr, do_ptr,
                               stride_qt, stride_dot, lse_ptr, delta_ptr, COS, SIN, T, qk_scale,
                               HALF, BLOCK_M, CAUSAL, ROPE, False, DOT_PRECISION)
    dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, mid_hi, T, q_ptr, do_ptr,
                               stride_qt, stride_dot, lse_ptr, delta_ptr, COS, SIN, T, qk_scale,
                               HALF, BLOCK_M, CAUSAL, ROPE, True, DOT_PRECISION)
    out = bh.to(tl.int64) * T * HEAD_DIM
    _store_unrot(DK + out, offs_n, T, dk1 * scale, dk2 * scale, COS, SIN, HALF, ROPE)
    tl.store(DV + out + offs_n[:, None] * HEAD_DIM + cols[None, :], dv.to(DV.dtype.element_ty),
             mask=(offs_n < T)[:, None])


@triton.jit
def _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, lo, hi, k_ptr, v_ptr, stride_kt, stride_vt,
              cos_ptr, sin_ptr, T, qk_scale,
              HALF: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              ROPE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dq_r (two halves) of one query block over key blocks [lo, hi)."""
    cols = tl.arange(0, 2 * HALF)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_rot(k_ptr, stride_kt, offs_n, T, cos_ptr, sin_ptr, HALF, ROPE)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vt + cols[None, :], mask=(offs_n < T)[:, None], other=0.0)
        z = _dot_halves(q1, q2, k1, k2, HALF, DOT_PRECISION) * qk_scale
        p = tl.math.exp2(z - lse[:, None])
        if MASKED:
            keep = (offs_n < T)[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _bwd_dq_kernel(
    Q, K, V,  # *(B, H, T, D) forward inputs, last dim contiguous
    COS, SIN,  # *(T, D/2) fp32 rotary tables (not read when ROPE is False)
    DO,  # *(B, H, T, D) upstream gradient, last dim contiguous
    LSE, DELTA,  # *(B*H, T) fp32: forward lse2 and rowsum(dO * o)
    DQ,  # *(B, H, T, D) contiguous output
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_rows = offs_m < T
    cols = tl.arange(0, HEAD_DIM)
    q1, q2 = _load_rot(Q + b.to(tl.int64) * stride_qb + h * stride_qh, stride_qt, offs_m, T, COS, SIN, HALF, ROPE)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + cols[None, :],
                 mask=in_rows[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=in_rows, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=in_rows, other=0.0)
    k_ptr = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + h * stride_vh
    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    if CAUSAL:
        split = start_m  # BLOCK_M % BLOCK_N == 0
        masked_hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        split = (T // BLOCK_N) * BLOCK_N
        masked_hi = T
    dq1, dq2 = _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, 0, split, k_ptr, v_ptr, stride_kt,
                         stride_vt, COS, SIN, T, qk_scale, HALF, BLOCK_N, CAUSAL, ROPE, False, DOT_PRECISION)
    dq1, dq2 = _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, split, masked_hi, k_ptr, v_ptr,
                         stride_kt, stride_vt, COS, SIN, T, qk_scale, HALF, BLOCK_N, CAUSAL, ROPE, True,
                         DOT_PRECISION)
    _store_unrot(DQ + bh.to(tl.int64) * T * HEAD_DIM, offs_m, T, dq1 * scale, dq2 * scale, COS, SIN, HALF, ROPE)


# ----------------------------------------------------------------------------- autotuning

def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages) per kernel, for head dims up to 64 and for 128. Causal
# staging needs BLOCK_M % BLOCK_N == 0 in the forward and dq kernels (a query block owns whole
# key blocks) and BLOCK_N % BLOCK_M == 0 in dk/dv. Survivors of the static report (bf16, rotary,
# sm_80 and sm_90): every config here compiles with 0 spill bytes and fits shared memory on
# both (A100 164 KB, H100 228 KB). Pruned for spilling on sm_80: fwd 128x128 (432 B);
# dk/dv 32x64 w4, 32x128, 64x64, 64x128 (112-944 B); dq 128x32 w4, 64x64, 128x64 (264-520 B);
# at D=128: fwd 128x64 w8 (392 B), dk/dv 16x64, 32x64, 16x128 (112-5072 B), dq 64x32, 128x32,
# 64x16 w4 (224-776 B). Small tiles that keep tensor cores busy without spilling remain.
CONFIGS = {
    "fwd": {64: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3)],
            128: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3)]},
    "dkdv": {64: [(16, 64, 4, 3), (16, 64, 4, 2), (32, 64, 8, 3), (16, 128, 8, 3)],
             128: [(16, 32, 4, 3)]},
    "dq": {64: [(64, 32, 4, 3), (128, 32, 8, 3)],
           128: [(32, 32, 4, 3), (64, 16, 8, 3)]},
}
# The interpreter runs one config: mixed block sizes so the multi-block diagonal is exercised.
_PINNED = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}


def configs_for(kernel, head_dim):
    """The (BLOCK_M, BLOCK_N, warps, stages) tuples the autotuner may try at this head dim."""
    return CONFIGS[kernel][64 if head_dim <= 64 else 128]


def _prune_for(kernel):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        allowed = set(configs_for(kernel, head_dim))
        fit = [c for c in configs if _key(c) in allowed]
        # Blocks much longer than the sequence only add masked work; keep at least one config.
        longest = max(32, triton.next_power_of_2(named_args["T"]))
        short = [c for c in fit if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= longest]
        return short or fit[:1] or configs[:1]
    return prune


def _key(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _tuned(kernel, name):
    if _INTERPRET:
        tuples = [_PINNED[name]]
    else:
        tuples = sorted({c for per_dim in CONFIGS[name].values() for c in per_dim})
    return triton.autotune(configs=[_cfg(*c) for c in tuples], key=["T", "HEAD_DIM", "CAUSAL", "ROPE"],
                           prune_configs_by={"early_config_prune": _prune_for(name)})(kernel)


_fwd = _tuned(_fwd_kernel, "fwd")
_bwd_dkdv = _tuned(_bwd_dkdv_kernel, "dkdv")
_bwd_dq = _tuned(_bwd_dq_kernel, "dq")


# ----------------------------------------------------------------------------- launchers

def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(q, cos, scale):
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    rope = cos is not None
    precision = dot_precision(q.dtype, q.device)  # fp32: TF32 when torch allows it, read per launch
    return B, H, T, D, scale, rope, precision


def _tables(q, cos, sin):
    if cos is None:  # the kernel never reads them; any fp32 pointer will do
        dummy = torch.empty(1, dtype=torch.float32, device=q.device)
        return dummy, dummy
    return cos.contiguous(), sin.contiguous()


def _forward(q, k, v, cos, sin, causal, scale):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D, scale, rope, precision = _common(q, cos, scale)
    cos_t, sin_t = _tables(q, cos, sin)
    o = _alloc_output((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = _alloc_output((B * H, T), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _fwd[grid](q, k, v, cos_t, sin_t, o, lse,
               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
               H, T, scale * LOG2E,
               HEAD_DIM=D, CAUSAL=causal, ROPE=rope, DOT_PRECISION=precision)
    return o, lse


def _backward(do, q, k, v, cos, sin, o, lse, causal, scale):
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    B, H, T, D, scale, rope, precision = _common(q, cos, scale)
    cos_t, sin_t = _tables(q, cos, sin)
    delta = _alloc_output(lse.shape, dtype=torch.float32, device=q.device)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(T, block), B * H)](o, do, delta, *do.stride()[:3], H, T,
                                                      HEAD_DIM=D, BLOCK_M=block)
    dq, dk, dv = (_alloc_output((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    meta = dict(HEAD_DIM=D, CAUSAL=causal, ROPE=rope, DOT_PRECISION=precision)
    _bwd_dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * H)](
        q, k, v, cos_t, sin_t, do, lse, delta, dk, dv, *strides, H, T, scale * LOG2E, scale, **meta)
    _bwd_dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
        q, k, v, cos_t, sin_t, do, lse, delta, dq, *strides, H, T, scale * LOG2E, scale, **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd

# Custom ops make the kernels opaque nodes for torch.compile (it runs the fake versions while
# tracing and the kernels at run time), instead of tracing into the autotuned launchers.
@torch.library.custom_op("tsfast::rope_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
            sin: torch.Tensor | None, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cos, sin, causal, scale)


@_fwd_op.register_fake
def _(q, k, v, cos, sin, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B * H, T), dtype=torch.float32)


@torch.library.custom_op("tsfast::rope_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cos: torch.Tensor | None, sin: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor,
            causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, cos, sin, o, lse, causal, scale)


@_bwd_op.register_fake
def _(do, q, k, v, cos, sin, o, lse, causal, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))


class RopeAttention(torch.autograd.Function):
    """o = softmax(rope(q) rope(k)^T * scale + causal mask) v; saves o and lse2 for backward."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, causal, scale):
        o, lse = _fwd_op(q, k, v, cos, sin, causal, scale)
        ctx.save_for_backward(q, k, v, cos, sin, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, cos, sin, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do, q, k, v, cos, sin, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def rope_attention(q, k, v, cos, sin, *, causal=True, scale=None, dropout_p=0.0):
    """The Triton path of `tsfast.ops.rope_attention` (arguments already validated there)."""
    if dropout_p:
        raise ValueError("the Triton attention kernel has no dropout: tsfast.ops sends dropout_p > 0 to torch")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return RopeAttention.apply(q, k, v, cos, sin, bool(causal), scale)


# ----------------------------------------------------------------------------- static report

REPORT_SHAPES = {"gpt2": (12, 12, 1024, 64), "baby_gpu": (64, 6, 512, 64)}  # (B, H, T, D)


def report_cases(dtype="bf16", rope=True, causal=True):
    """One compilation per autotune config per kernel at the preset shapes (see module doc).

    "attrs" marks the pointer and stride arguments that the runtime would specialize as
    16-divisible at these shapes (q, k, v as views of a fused (B, T, 3, H, D) projection)."""
    kernels = [("fwd", _fwd_kernel, ["OUT"]), ("dkdv", _bwd_dkdv_kernel, ["DK", "DV"]),
               ("dq", _bwd_dq_kernel, ["DQ"])]
    cases = []
    for shape, (_, _, T, D) in REPORT_SHAPES.items():
        for kernel, fn, outputs in kernels:
            for block_m, block_n, warps, stages in configs_for(kernel, D):
                sig, divisible = {}, []
                for i, arg in enumerate(fn.arg_names):
                    if arg in ("Q", "K", "V", "DO", *outputs):
                        sig[arg] = f"*{dtype}"
                    elif arg in ("COS", "SIN", "LSE", "DELTA"):
                        sig[arg] = "*fp32"
                    elif arg in ("qk_scale", "scale"):
                        sig[arg] = "fp32"
                    elif arg.isupper() and arg not in ("H", "T"):
                        sig[arg] = "constexpr"
                    else:
                        sig[arg] = "i32"
                    if sig[arg].startswith("*") or arg.startswith("stride_") or arg == "T" and T % 16 == 0:
                        divisible.append((i,))
                constexprs = dict(HEAD_DIM=D, CAUSAL=causal, ROPE=rope, DOT_PRECISION="tf32",
                                  BLOCK_M=block_m, BLOCK_N=block_n)
                cases.append({"name": f"rope_attention_{kernel}", "fn": fn, "signature": sig,
                              "constexprs": constexprs, "num_warps": warps, "num_stages": stages,
                              "config": f"BM{block_m}-BN{block_n}-w{warps}-s{stages}",
                              "shape": shape, "attrs": {k: [["tt.divisibility", 16]] for k in divisible}})
    return cases
