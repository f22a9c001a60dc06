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
no atomics, so the backward is bit-identical run to run. The backward kernels live in
rope_attention_backward.py.

Document mask (doc_ids, the contract in tsfast/ops/attention.py; Tq == Tk): the launchers turn
doc_ids into int32 (B, T) tables start[t] (first index of t's document) and end[t] (one past
its last); query t sees key s iff start[t] <= s < end[t] (and s <= t if causal), and every
token is rotated at pos = t - start[t] (cos/sin rows gathered per token). Work skipping:
a query block starts at the key block holding its first row's document start; key blocks
from start[last row] up to the diagonal (causal) or to end[first row] (not causal) hold only
keys every row sees and run unmasked; the others (document boundaries, diagonal, tail) run
masked. The dk/dv program of a key block visits query blocks from the diagonal (causal) or
start[first key], up to end[last key], staged the same way. In a masked block a row may see
no key yet, so the running max is guarded against exp2(-inf - -inf). Without doc_ids the
constexpr DOC_MASK is False and none of this is compiled: the kernels are the ones without it.

Static GPU report (`report_cases()`, bf16, D=64): every config in CONFIGS compiles for sm_80
and sm_90 with 0 spill bytes, HMMA (sm_80) / HGMMA (sm_90) and 128-bit loads; sm_80 uses
168-255 registers a thread (rotated q/k tiles plus fp32 accumulators), sm_90 118-246 (D=128 configs: see CONFIGS).
The document-masked variants ("_doc" rows) use DOC_MASK_CONFIGS, also 0 spill bytes on both.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from tsfast.kernels.precision import dot_precision
from tsfast.kernels.rope_attention_backward import (
    _bwd_delta_kernel,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _doc_key_range,
    _doc_pos,
    _dot_halves,
    _load_rot,
    _row_keep,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
_alloc_output = torch.empty  # every kernel output is allocated through this: tests swap in a NaN-filled one


@triton.jit
def _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, row_start, row_end, doc_start, lo, hi, k_ptr, v_ptr,
               stride_kt, stride_vt, start_ptr, cos_ptr, sin_ptr, T, qk_scale,
               HALF: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
               MASKED: tl.constexpr, DOC_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASKED applies the causal, document and tail masks."""
    cols = tl.arange(0, 2 * HALF)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        pos_n = _doc_pos(offs_n, start_ptr, T, doc_start, ROPE, DOC_MASK, MASKED)
        k1, k2 = _load_rot(k_ptr, stride_kt, offs_n, pos_n, T, cos_ptr, sin_ptr, HALF, ROPE)
        z = _dot_halves(q1, q2, k1, k2, HALF, DOT_PRECISION) * qk_scale
        if MASKED:
            z = tl.where(_row_keep(offs_m, offs_n, row_start, row_end, T, CAUSAL, DOC_MASK), z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_sub = m_new
        if DOC_MASK and MASKED:  # a row may have seen no key yet: exp2(-inf - -inf) would be NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(z - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vt + cols[None, :], mask=(offs_n < T)[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V,  # *(B, H, T, D) inputs, last dim contiguous, other strides free
    COS, SIN,  # *(T, D/2) fp32 rotary tables (not read when ROPE is False)
    START, END,  # *(B, T) int32: first index of each token's document, one past its last (DOC_MASK only)
    OUT,  # *(B, H, T, D) contiguous output
    LSE,  # *(B*H, T) fp32 output: base-2 log-sum-exp of each row's scaled scores
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    H, T, qk_scale,  # qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, DOC_MASK: tl.constexpr,
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
    in_rows = offs_m < T
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if DOC_MASK:
        start_ptr = START + b.to(tl.int64) * T
        end_ptr = END + b.to(tl.int64) * T
        row_start = tl.load(start_ptr + offs_m, mask=in_rows, other=0)
        row_end = tl.load(end_ptr + offs_m, mask=in_rows, other=T)  # padding rows: no NaN
        q1, q2 = _load_rot(q_ptr, stride_qt, offs_m, offs_m - row_start, T, COS, SIN, HALF, ROPE)
        lo, mid_lo, mid_hi, hi, doc_start = _doc_key_range(start_ptr, end_ptr, start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, row_start, row_end, doc_start, lo, mid_lo,
                                   k_ptr, v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale,
                                   HALF, BLOCK_N, CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, row_start, row_end, doc_start, mid_lo, mid_hi,
                                   k_ptr, v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale,
                                   HALF, BLOCK_N, CAUSAL, ROPE, False, DOC_MASK, DOT_PRECISION)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, row_start, row_end, doc_start, mid_hi, hi,
                                   k_ptr, v_ptr, stride_kt, stride_vt, start_ptr, COS, SIN, T, qk_scale,
                                   HALF, BLOCK_N, CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
    else:
        q1, q2 = _load_rot(q_ptr, stride_qt, offs_m, offs_m, T, COS, SIN, HALF, ROPE)
        # Unmasked stage: whole key blocks below the diagonal (causal) or before the tail.
        if CAUSAL:
            split = start_m  # BLOCK_M % BLOCK_N == 0, so a whole number of key blocks
            masked_hi = tl.minimum(start_m + BLOCK_M, T)
        else:
            split = (T // BLOCK_N) * BLOCK_N
            masked_hi = T
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, offs_m, offs_m, 0, 0, split, k_ptr, v_ptr,
                                   stride_kt, stride_vt, START, COS, SIN, T, qk_scale, HALF, BLOCK_N,
                                   CAUSAL, ROPE, False, DOC_MASK, DOT_PRECISION)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q1, q2, offs_m, offs_m, offs_m, 0, split, masked_hi, k_ptr,
                                   v_ptr, stride_kt, stride_vt, START, COS, SIN, T, qk_scale, HALF, BLOCK_N,
                                   CAUSAL, ROPE, True, DOC_MASK, DOT_PRECISION)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=in_rows)
    o = acc / l_i[:, None]
    o_ptrs = OUT + bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=in_rows[:, None])


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

# The document-masked variant (DOC_MASK) keeps a few more values live (document bounds, stage
# limits). Static report as above: these spilled in it and are not tried for it: at D=64 fwd
# 128x64 w4 (sm_90, 8 B), dk/dv 32x64 w8 (sm_80, 112 B); at D=128 fwd 64x64 (sm_90, 88 B),
# dk/dv 16x32 w4 (sm_90, 32 B; 16x32 w8 replaces it), dq 64x16 w8 (sm_80, 144 B).
DOC_MASK_CONFIGS = {
    "fwd": {64: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)],
            128: [(64, 32, 4, 3), (128, 32, 8, 3)]},
    "dkdv": {64: [(16, 64, 4, 3), (16, 64, 4, 2), (16, 128, 8, 3)],
             128: [(16, 32, 8, 3)]},
    "dq": {64: [(64, 32, 4, 3), (128, 32, 8, 3)],
           128: [(32, 32, 4, 3)]},
}


# fp32 inputs: fp32 tiles take twice the registers and shared memory, and "ieee" dots (torch's
# default for fp32, no TF32) more still. Keyed by (DOT_PRECISION, DOC_MASK). Survivors of the
# static report (report_cases(dtype="fp32"), D=64): the 16-bit lists spilled here (TF32: fwd
# 128x64 w4 48-208 B, every dk/dv config 112-3248 B, dq 288-360 B on sm_80; the document mask
# adds fwd 64x64 w4 and dq 64x16 w4; ieee: every fwd tile above 64x32 spilled 848-7888 B).
FP32_CONFIGS = {
    ("tf32", False): {"fwd": [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)],
                      "dkdv": [(16, 16, 4, 3)], "dq": [(64, 16, 4, 3), (64, 16, 8, 3)]},
    ("tf32", True): {"fwd": [(64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)],
                     "dkdv": [(16, 16, 4, 3)], "dq": [(64, 16, 8, 3)]},
    ("ieee", False): {"fwd": [(64, 32, 4, 3)], "dkdv": [(16, 16, 4, 3)], "dq": [(64, 16, 4, 3), (64, 16, 8, 3)]},
    ("ieee", True): {"fwd": [(32, 32, 4, 3)], "dkdv": [(16, 16, 4, 3)], "dq": [(64, 16, 8, 3)]},
}


def configs_for(kernel, head_dim, doc_mask=False, fp32_precision=None):
    """The (BLOCK_M, BLOCK_N, warps, stages) tuples the autotuner may try at this head dim;
    fp32_precision ("tf32" or "ieee") for fp32 inputs, None for 16-bit ones. The fp32 lists
    hold the smallest tiles, checked at D=64; D=128 in fp32 uses them too (unchecked)."""
    if fp32_precision is not None:
        return FP32_CONFIGS[(fp32_precision, doc_mask)][kernel]
    return (DOC_MASK_CONFIGS if doc_mask else CONFIGS)[kernel][64 if head_dim <= 64 else 128]


def _prune_for(kernel):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        doc_mask = kwargs.get("DOC_MASK", named_args.get("DOC_MASK", False))
        fp32 = named_args["Q"].dtype == torch.float32  # the autotuner keys on argument dtypes too
        precision = kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION")) if fp32 else None
        allowed = set(configs_for(kernel, head_dim, doc_mask, precision))
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
        lists = [*CONFIGS[name].values(), *DOC_MASK_CONFIGS[name].values(), *(t[name] for t in FP32_CONFIGS.values())]
        tuples = sorted({c for configs in lists for c in configs})
    return triton.autotune(configs=[_cfg(*c) for c in tuples],
                           key=["T", "HEAD_DIM", "CAUSAL", "ROPE", "DOC_MASK", "DOT_PRECISION"],
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


def doc_bounds(doc_ids):
    """(start, end), int32 (B, T) on doc_ids' device: the index of the first token of each
    token's document and one past its last. doc_ids: (B, T), non-decreasing along T."""
    B, T = doc_ids.shape
    idx = torch.arange(T, dtype=torch.int32, device=doc_ids.device).expand(B, T)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    edge = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    first, last = torch.cat((edge, change), 1), torch.cat((change, edge), 1)
    start = torch.where(first, idx, 0).cummax(1).values
    end = torch.where(last, idx + 1, T).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _doc_args(q, doc_ids):
    """START, END for the kernels and the DOC_MASK flag (dummy pointers when doc_ids is None)."""
    if doc_ids is None:
        dummy = torch.empty(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, False
    if doc_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_ids must be (B, T) = {(q.shape[0], q.shape[2])}, got {tuple(doc_ids.shape)}")
    return *doc_bounds(doc_ids), True


def _forward(q, k, v, cos, sin, causal, scale, doc_ids=None):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D, scale, rope, precision = _common(q, cos, scale)
    cos_t, sin_t = _tables(q, cos, sin)
    start, end, doc_mask = _doc_args(q, doc_ids)
    o = _alloc_output((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = _alloc_output((B * H, T), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _fwd[grid](q, k, v, cos_t, sin_t, start, end, o, lse,
               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
               H, T, scale * LOG2E,
               HEAD_DIM=D, CAUSAL=causal, ROPE=rope, DOC_MASK=doc_mask, DOT_PRECISION=precision)
    return o, lse


def _backward(do, q, k, v, cos, sin, o, lse, causal, scale, doc_ids=None):
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    B, H, T, D, scale, rope, precision = _common(q, cos, scale)
    cos_t, sin_t = _tables(q, cos, sin)
    start, end, doc_mask = _doc_args(q, doc_ids)
    delta = _alloc_output(lse.shape, dtype=torch.float32, device=q.device)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(T, block), B * H)](o, do, delta, *do.stride()[:3], H, T,
                                                      HEAD_DIM=D, BLOCK_M=block)
    dq, dk, dv = (_alloc_output((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    meta = dict(HEAD_DIM=D, CAUSAL=causal, ROPE=rope, DOC_MASK=doc_mask, DOT_PRECISION=precision)
    _bwd_dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * H)](
        q, k, v, cos_t, sin_t, start, end, do, lse, delta, dk, dv, *strides, H, T, scale * LOG2E, scale, **meta)
    _bwd_dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
        q, k, v, cos_t, sin_t, start, end, do, lse, delta, dq, *strides, H, T, scale * LOG2E, scale, **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- entry points
# Called by tsfast/ops/attention.py, which registers them as torch.library custom ops and
# validates the arguments first.


def forward(q, k, v, cos, sin, causal: bool, scale: float, *, doc_ids=None):
    """(o, lse2): the attention output (B, H, T, D) and the base-2 log-sum-exp (B*H, T) fp32."""
    return _forward(q, k, v, cos, sin, causal, scale, doc_ids)


def backward(do, q, k, v, cos, sin, o, lse, causal: bool, scale: float, *, doc_ids=None):
    """(dq, dk, dv) with respect to the un-rotated q and k."""
    return _backward(do, q, k, v, cos, sin, o, lse, causal, scale, doc_ids)


# ----------------------------------------------------------------------------- static report

REPORT_SHAPES = {"gpt2": (12, 12, 1024, 64), "baby_gpu": (64, 6, 512, 64)}  # (B, H, T, D)


def report_cases(dtype=None, rope=True, causal=True):
    """One compilation per autotune config per kernel at the preset shapes, without and with
    the document mask ("_doc" names; see module doc), in bf16 and in fp32 (TF32 and "ieee"
    dots, "_fp32" and "_fp32_ieee" names) unless `dtype` picks one.

    "attrs" marks the pointer and stride arguments that the runtime would specialize as
    16-divisible at these shapes (q, k, v as views of a fused (B, T, 3, H, D) projection)."""
    kernels = [("fwd", _fwd_kernel, ["OUT"]), ("dkdv", _bwd_dkdv_kernel, ["DK", "DV"]),
               ("dq", _bwd_dq_kernel, ["DQ"])]
    variants = [("bf16", "tf32", ""), ("fp32", "tf32", "_fp32"), ("fp32", "ieee", "_fp32_ieee")]
    cases = []
    for (elem, precision, suffix), (shape, (_, _, T, D)), doc_mask, (kernel, fn, outputs) in itertools.product(
            [v for v in variants if dtype in (None, v[0])], REPORT_SHAPES.items(), (False, True), kernels):
        for block_m, block_n, warps, stages in configs_for(kernel, D, doc_mask, precision if elem == "fp32" else None):
            sig, divisible = {}, []
            for i, arg in enumerate(fn.arg_names):
                if arg in ("Q", "K", "V", "DO", *outputs):
                    sig[arg] = f"*{elem}"
                elif arg in ("COS", "SIN", "LSE", "DELTA"):
                    sig[arg] = "*fp32"
                elif arg in ("START", "END"):
                    sig[arg] = "*i32"
                elif arg in ("qk_scale", "scale"):
                    sig[arg] = "fp32"
                elif arg.isupper() and arg not in ("H", "T"):
                    sig[arg] = "constexpr"
                else:
                    sig[arg] = "i32"
                if sig[arg].startswith("*") or arg.startswith("stride_") or arg == "T" and T % 16 == 0:
                    divisible.append((i,))
            constexprs = dict(HEAD_DIM=D, CAUSAL=causal, ROPE=rope, DOC_MASK=doc_mask,
                              DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n)
            cases.append({"name": f"rope_attention_{kernel}{'_doc' if doc_mask else ''}{suffix}", "fn": fn,
                          "signature": sig, "constexprs": constexprs, "num_warps": warps,
                          "num_stages": stages, "config": f"BM{block_m}-BN{block_n}-w{warps}-s{stages}",
                          "shape": shape, "attrs": {k: [["tt.divisibility", 16]] for k in divisible}})
    return cases
