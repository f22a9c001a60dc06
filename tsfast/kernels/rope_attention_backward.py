"""Backward kernels of the fused rotary + flash attention (the math is in
`tsfast.kernels.rope_attention`), and the Triton helpers both directions share: they live here
so that the forward module can import them without a circular import.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rot(x_ptr, stride_t, rows, pos, T, cos_ptr, sin_ptr, HALF: tl.constexpr, ROPE: tl.constexpr):
    """Rows `rows` of one (T, D) head as two (rows, D/2) halves, rotated when ROPE.

    x_ptr: first element of this head's (T, D) matrix; cos_ptr, sin_ptr: (T, D/2) fp32 tables,
    read at the rows' rotary positions `pos`. Rows at or past T load as 0.
    """
    cols = tl.arange(0, HALF)
    in_rows = (rows < T)[:, None]
    ptrs = x_ptr + rows[:, None] * stride_t + cols[None, :]
    x1 = tl.load(ptrs, mask=in_rows, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=in_rows, other=0.0)
    if ROPE:
        table = pos[:, None] * HALF + cols[None, :]
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
def _store_unrot(ptr, rows, pos, T, g1, g2, cos_ptr, sin_ptr, HALF: tl.constexpr, ROPE: tl.constexpr):
    """Store fp32 gradient halves of rotated rows (rotary positions `pos`) as R^T g into a
    contiguous (T, D) head at ptr."""
    cols = tl.arange(0, HALF)
    in_rows = (rows < T)[:, None]
    if ROPE:
        table = pos[:, None] * HALF + cols[None, :]
        c = tl.load(cos_ptr + table, mask=in_rows, other=0.0)
        s = tl.load(sin_ptr + table, mask=in_rows, other=0.0)
        g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
    ptrs = ptr + rows[:, None] * (2 * HALF) + cols[None, :]
    tl.store(ptrs, g1.to(ptr.dtype.element_ty), mask=in_rows)
    tl.store(ptrs + HALF, g2.to(ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def _doc_pos(rows, start_ptr, T, base, ROPE: tl.constexpr, DOC_MASK: tl.constexpr, GATHER: tl.constexpr):
    """Rotary positions of `rows`: their index, or with DOC_MASK their index minus their
    document's start, gathered per row (GATHER) or, in blocks wholly inside one document, `base`."""
    pos = rows
    if DOC_MASK and ROPE:
        if GATHER:
            pos = rows - tl.load(start_ptr + rows, mask=rows < T, other=0)
        else:
            pos = rows - base
    return pos


@triton.jit
def _doc_key_range(start_ptr, end_ptr, start_m, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """Key blocks a query block visits with DOC_MASK: [lo, mid_lo) masked, [mid_lo, mid_hi)
    unmasked (every key visible to every row), [mid_hi, hi) masked; and the one document start
    of the unmasked blocks. start_ptr, end_ptr: this row's (T,) int32 document bounds."""
    last = tl.minimum(start_m + BLOCK_M, T) - 1
    last_start = tl.load(start_ptr + last)
    lo = tl.load(start_ptr + start_m) // BLOCK_N * BLOCK_N  # nothing before the first row's document
    if CAUSAL:
        hi = last + 1
        full_hi = start_m  # blocks wholly below the diagonal
    else:
        hi = tl.load(end_ptr + last)
        full_hi = tl.load(end_ptr + start_m) // BLOCK_N * BLOCK_N  # wholly inside the first row's document
    mid_lo = tl.minimum((last_start + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    mid_hi = tl.maximum(mid_lo, full_hi)
    return lo, mid_lo, mid_hi, tl.maximum(mid_hi, hi), last_start


@triton.jit
def _doc_query_range(start_ptr, end_ptr, start_n, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr):
    """The query blocks a key block's dk/dv program visits with DOC_MASK, staged as in
    `_doc_key_range`: they end at the last row of the last key's document."""
    last = tl.minimum(start_n + BLOCK_N, T) - 1
    last_start = tl.load(start_ptr + last)
    hi = tl.load(end_ptr + last)
    if CAUSAL:
        lo = start_n  # BLOCK_N % BLOCK_M == 0
        full_lo = start_n + BLOCK_N  # blocks wholly past the diagonal
    else:
        lo = tl.load(start_ptr + start_n) // BLOCK_M * BLOCK_M
        full_lo = 0
    mid_lo = tl.minimum(tl.maximum((last_start + BLOCK_M - 1) // BLOCK_M * BLOCK_M, full_lo), hi)
    mid_hi = tl.maximum(mid_lo, tl.load(end_ptr + start_n) // BLOCK_M * BLOCK_M)
    return lo, mid_lo, mid_hi, tl.maximum(mid_hi, hi), last_start


@triton.jit
def _row_keep(offs_m, offs_n, row_start, row_end, T, CAUSAL: tl.constexpr, DOC_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the keys each query row attends; row_start, row_end: the
    rows' document bounds (read only with DOC_MASK)."""
    keep = (offs_n < T)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if DOC_MASK:
        keep = keep & (offs_n[None, :] >= row_start[:, None])
        if not CAUSAL:  # causal: s <= t < end[t] already
            keep = keep & (offs_n[None, :] < row_end[:, None])
    return keep


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
def _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, key_start, key_end, doc_start, lo, hi, q_ptr, do_ptr,
                stride_qt, stride_dot, lse_ptr, delta_ptr, start_ptr, cos_ptr, sin_ptr, T, qk_scale,
                HALF: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
                MASKED: tl.constexpr, DOC_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk_r (two halves) and dv of one key block over query blocks [lo, hi)."""
    cols = tl.arange(0, 2 * HALF)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_rows = offs_m < T
        pos_m = _doc_pos(offs_m, start_ptr, T, doc_start, ROPE, DOC_MASK, MASKED)
        q1, q2 = _load_rot(q_ptr, stride_qt, offs_m, pos_m, T, cos_ptr, sin_ptr, HALF, ROPE)
        do = tl.load(do_ptr + offs_m[:, None] * stride_dot + cols[None, :], mask=in_rows[:, None], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=in_rows, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=in_rows, other=0.0)
        zT = _dot_halves(k1, k2, q1, q2, HALF, DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(zT - lse[None, :])
        if MASKED:
            keep = in_rows[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            if DOC_MASK:  # row t sees key s iff start[s] <= t < end[s]
                keep = keep & (offs_m[None, :] < key_end[:, None])
                if not CAUSAL:
                    keep = keep & (offs_m[None, :] >= key_start[:, None])
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
    START, END,  # *(B, T) int32 document bounds per token (DOC_MASK only), as in the forward
    DO,  # *(B, H, T, D) upstream gradient, last dim contiguous
    LSE, DELTA,  # *(B*H, T) fp32: forward lse2 and rowsum(dO * o)
    DK, DV,  # *(B, H, T, D) contiguous outputs
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, DOC_MASK: tl.constexpr,
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
    start_ptr = START + b.to(tl.int64) * T
    end_ptr = END + b.to(tl.int64) * T
    key_start = offs_n  # the keys' document bounds; placeholders without DOC_MASK
    key_end = offs_n
    pos_n = offs_n
    if DOC_MASK:
        key_start = tl.load(start_ptr + offs_n, mask=offs_n < T, other=0)
        key_end = tl.load(end_ptr + offs_n, mask=offs_n < T, other=0)
        pos_n = offs_n - key_start
    k1, k2 = _load_rot(K + b.to(tl.int64) * stride_kb + h * stride_kh, stride_kt, offs_n, pos_n, T, COS, SIN,
                       HALF, ROPE)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + cols[None, :],
                mask=(offs_n < T)[:, None], other=0.0)
    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if DOC_MASK:
        lo, mid_lo, mid_hi, hi, doc_start = _doc_query_range(start_ptr, end_ptr, start_n, T, BLOCK_M, BLOCK_N,
                                                             CAUSAL)
        dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, key_start, key_end, doc_start, lo, mid_lo,
                                   q_ptr, do_ptr, stride_qt, stride_dot, lse_ptr, delta_ptr, start_ptr, COS, SIN,
                                   T, qk_scale, HALF, BLOCK_M, CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
        dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, key_start, key_end, doc_start, mid_lo,
                                   mid_hi, q_ptr, do_ptr, stride_qt, stride_dot, lse_ptr, delta_ptr, start_ptr,
                                   COS, SIN, T, qk_scale, HALF, BLOCK_M, CAUSAL, ROPE, False, DOC_MASK,
                                   DOT_PRECISION)
        dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, key_start, key_end, doc_start, mid_hi, hi,
                                   q_ptr, do_ptr, stride_qt, stride_dot, lse_ptr, delta_ptr, start_ptr, COS, SIN,
                                   T, qk_scale, HALF, BLOCK_M, CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
    else:
        # Stages: the diagonal (causal only, masked), whole query blocks (unmasked), the tail (masked).
        full_hi = (T // BLOCK_M) * BLOCK_M
        if CAUSAL:
            diag_hi = tl.minimum(start_n + BLOCK_N, T)  # BLOCK_N % BLOCK_M == 0
            dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, key_start, key_end, 0, start_n, diag_hi,
                                       q_ptr, do_ptr, stride_qt, stride_dot, lse_ptr, delta_ptr, start_ptr, COS,
                                       SIN, T, qk_scale, HALF, BLOCK_M, CAUSAL, ROPE, True, DOC_MASK,
                                       DOT_PRECISION)
            mid_lo = start_n + BLOCK_N
        else:
            mid_lo = 0
        mid_hi = tl.maximum(mid_lo, full_hi)
        dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, key_start, key_end, 0, mid_lo, mid_hi,
                                   q_ptr, do_ptr, stride_qt, stride_dot, lse_ptr, delta_ptr, start_ptr, COS, SIN,
                                   T, qk_scale, HALF, BLOCK_M, CAUSAL, ROPE, False, DOC_MASK, DOT_PRECISION)
        dk1, dk2, dv = _dkdv_stage(dk1, dk2, dv, k1, k2, v, offs_n, key_start, key_end, 0, mid_hi, T,
                                   q_ptr, do_ptr, stride_qt, stride_dot, lse_ptr, delta_ptr, start_ptr, COS, SIN,
                                   T, qk_scale, HALF, BLOCK_M, CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
    out = bh.to(tl.int64) * T * HEAD_DIM
    _store_unrot(DK + out, offs_n, pos_n, T, dk1 * scale, dk2 * scale, COS, SIN, HALF, ROPE)
    tl.store(DV + out + offs_n[:, None] * HEAD_DIM + cols[None, :], dv.to(DV.dtype.element_ty),
             mask=(offs_n < T)[:, None])


@triton.jit
def _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, row_start, row_end, doc_start, lo, hi, k_ptr, v_ptr,
              stride_kt, stride_vt, start_ptr, cos_ptr, sin_ptr, T, qk_scale,
              HALF: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
              MASKED: tl.constexpr, DOC_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dq_r (two halves) of one query block over key blocks [lo, hi)."""
    cols = tl.arange(0, 2 * HALF)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        pos_n = _doc_pos(offs_n, start_ptr, T, doc_start, ROPE, DOC_MASK, MASKED)
        k1, k2 = _load_rot(k_ptr, stride_kt, offs_n, pos_n, T, cos_ptr, sin_ptr, HALF, ROPE)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vt + cols[None, :], mask=(offs_n < T)[:, None], other=0.0)
        z = _dot_halves(q1, q2, k1, k2, HALF, DOT_PRECISION) * qk_scale
        p = tl.math.exp2(z - lse[:, None])
        if MASKED:
            p = tl.where(_row_keep(offs_m, offs_n, row_start, row_end, T, CAUSAL, DOC_MASK), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _bwd_dq_kernel(
    Q, K, V,  # *(B, H, T, D) forward inputs, last dim contiguous
    COS, SIN,  # *(T, D/2) fp32 rotary tables (not read when ROPE is False)
    START, END,  # *(B, T) int32 document bounds per token (DOC_MASK only), as in the forward
    DO,  # *(B, H, T, D) upstream gradient, last dim contiguous
    LSE, DELTA,  # *(B*H, T) fp32: forward lse2 and rowsum(dO * o)
    DQ,  # *(B, H, T, D) contiguous output
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, DOC_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_rows = offs_m < T
    cols = tl.arange(0, HEAD_DIM)
    start_ptr = START + b.to(tl.int64) * T
    end_ptr = END + b.to(tl.int64) * T
    row_start = offs_m  # the rows' document bounds; placeholders without DOC_MASK
    row_end = offs_m
    pos_m = offs_m
    if DOC_MASK:
        row_start = tl.load(start_ptr + offs_m, mask=in_rows, other=0)
        row_end = tl.load(end_ptr + offs_m, mask=in_rows, other=T)  # padding rows: no NaN
        pos_m = offs_m - row_start
    q1, q2 = _load_rot(Q + b.to(tl.int64) * stride_qb + h * stride_qh, stride_qt, offs_m, pos_m, T, COS, SIN,
                       HALF, ROPE)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + cols[None, :],
                 mask=in_rows[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=in_rows, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=in_rows, other=0.0)
    k_ptr = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + h * stride_vh
    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    if DOC_MASK:
        lo, mid_lo, mid_hi, hi, doc_start = _doc_key_range(start_ptr, end_ptr, start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
        dq1, dq2 = _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, row_start, row_end, doc_start, lo, mid_lo,
                             k_ptr, v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale, HALF, BLOCK_N,
                             CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
        dq1, dq2 = _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, row_start, row_end, doc_start, mid_lo,
                             mid_hi, k_ptr, v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale, HALF,
                             BLOCK_N, CAUSAL, ROPE, False, DOC_MASK, DOT_PRECISION)
        dq1, dq2 = _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, row_start, row_end, doc_start, mid_hi, hi,
                             k_ptr, v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale, HALF, BLOCK_N,
                             CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
    else:
        if CAUSAL:
            split = start_m  # BLOCK_M % BLOCK_N == 0
            masked_hi = tl.minimum(start_m + BLOCK_M, T)
        else:
            split = (T // BLOCK_N) * BLOCK_N
            masked_hi = T
        dq1, dq2 = _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, row_start, row_end, 0, 0, split, k_ptr,
                             v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale, HALF, BLOCK_N, CAUSAL,
                             ROPE, False, DOC_MASK, DOT_PRECISION)
        dq1, dq2 = _dq_stage(dq1, dq2, q1, q2, do, lse, delta, offs_m, row_start, row_end, 0, split, masked_hi,
                             k_ptr, v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale, HALF, BLOCK_N,
                             CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
    _store_unrot(DQ + bh.to(tl.int64) * T * HEAD_DIM, offs_m, pos_m, T, dq1 * scale, dq2 * scale, COS, SIN, HALF,
                 ROPE)
