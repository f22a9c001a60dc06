"""Gradient matmuls of `layernorm_linear` (the math is in `tsfast.kernels.layernorm_gelu`).

Two tiled matmuls whose A operand is dPre = dY * GELU'(pre), computed in registers as the
dY and pre tiles load (dPre is never written to memory):

    dLN = dPre @ W                (N, F) @ (F, C) -> (N, C), fp32 out, K = F
    dW  = dPre^T @ LN(x)          (F, N) @ (N, C) -> (F, C), K = N, LN recomputed on load
    db  = sum_rows dPre           the same pass as dW, as dPre^T @ ones on the tensor cores;
                                  the programs of the first C column block store it

In dW only the per-row part of LN, xhat = (x - mean) rstd, is recomputed on load; gamma and
beta are per output column, so the epilogue applies them once:
dW_fc = sum_i dPre_if (xhat_ic gamma_c + beta_c) = gamma_c (dPre^T xhat)_fc + beta_c db_f.
Applying them per tile kept two broadcast (K, N) fp32 tiles alive in registers (spills).

The shared Triton helpers (tanh-GELU, its derivative, grouped tile order) live here so that
the forward module can import them without a circular import.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _gelu_tanh(z):
    """0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3); fp32 in/out."""
    u = SQRT_2_OVER_PI * (z + GELU_CUBIC * z * z * z)
    return z / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _gelu_tanh_grad(z):
    """d/dz [z * s], s = sigmoid(2u): s + z * 2 s (1 - s) * u'(z), u' = sqrt(2/pi)(1 + 3c z^2)."""
    u = SQRT_2_OVER_PI * (z + GELU_CUBIC * z * z * z)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * z * z)
    return s + 2.0 * z * s * (1.0 - s) * du


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), walking GROUP_M tile rows column by column so
    that concurrently running programs share B tiles (and A tiles) in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _dpre_tile(DY, Pre, offs, mask, GELU: tl.constexpr):
    """dPre = dY * GELU'(pre) for one tile, in fp32 (dY itself without an activation)."""
    dpre = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        pre = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
        dpre = dpre * _gelu_tanh_grad(pre)
    return dpre


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dln_matmul_kernel(
    DY,  # (N, F) upstream gradient, contiguous
    Pre,  # (N, F) saved pre-activation, contiguous (read only when GELU)
    W,  # (F, C) linear weight, contiguous
    DLN,  # (N, C) fp32 out: gradient with respect to LayerNorm's output
    N, F, C,
    N_BUCKET,  # next power of two of N (capped): only the autotune key
    GELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" otherwise (unused)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N are wrapped (dim not contiguous in memory); columns past C are masked, since
    # a wrapped index would hide the contiguity that 128-bit loads need.
    rows_in = (rows % N).to(tl.int64)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, F, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < F
        dpre = _dpre_tile(DY, Pre, rows_in[:, None] * F + ks[None, :], k_ok[None, :], GELU)
        w = tl.load(W + ks[:, None] * C + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dpre.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    out_mask = (rows < N)[:, None] & col_ok[None, :]
    tl.store(DLN + rows.to(tl.int64)[:, None] * C + cols[None, :], acc, mask=out_mask)


@triton.jit
def _dw_matmul_kernel(
    DY,  # (N, F) upstream gradient, contiguous
    Pre,  # (N, F) saved pre-activation, contiguous (read only when GELU)
    X,  # (N, C) the LayerNorm input, contiguous
    Mean,  # (N,) fp32 row means
    Rstd,  # (N,) fp32 row reciprocal standard deviations
    LnW,  # (C,) LayerNorm gamma
    LnB,  # (C,) LayerNorm beta (read only when HAS_LN_BIAS)
    DW,  # (F, C) out: weight gradient, in the weight's dtype
    DB,  # (F,) out: bias gradient (written only when HAS_BIAS)
    N, F, C,
    N_BUCKET,  # next power of two of N (capped): only the autotune key
    GELU: tl.constexpr, HAS_LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(F, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    feats = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Features and columns are the contiguous dims of dY and x: masked, not wrapped.
    feat_ok = feats < F
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # db = dPre^T @ ones rides on the tensor cores (16 wide, the narrowest tl.dot) and
    # reuses the A operand; a tl.sum per step spilled on sm_80.
    ones = tl.full((BLOCK_K, 16), 1.0, dtype=X.dtype.element_ty)
    db = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for k in range(0, N, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        ks64 = ks.to(tl.int64)
        # dY^T tile loaded as (features, rows) so dPre is computed in the A operand's layout.
        # Rows past N load dY = 0, so they add nothing whatever x is there.
        dpre_t = _dpre_tile(DY, Pre, feats[:, None] + ks64[None, :] * F, feat_ok[:, None] & k_ok[None, :], GELU)
        dpre_t = dpre_t.to(X.dtype.element_ty)
        mean = tl.load(Mean + ks, mask=k_ok, other=0.0)
        rstd = tl.load(Rstd + ks, mask=k_ok, other=0.0)
        x = tl.load(X + ks64[:, None] * C + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # gamma and beta are per output column: applied once in the epilogue, not per tile.
        xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
        acc = tl.dot(dpre_t, xhat.to(x.dtype), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS or HAS_LN_BIAS:
            db = tl.dot(dpre_t, ones, db, input_precision=DOT_PRECISION)
    db_col = tl.max(db, axis=1)  # the 16 columns are equal
    # dW = sum_i dPre_if (xhat_ic gamma_c + beta_c) = gamma_c (dPre^T xhat)_fc + beta_c db_f
    acc = acc * tl.load(LnW + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LN_BIAS:
        beta = tl.load(LnB + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += db_col[:, None] * beta[None, :]
    out_mask = feat_ok[:, None] & col_ok[None, :]
    tl.store(DW + feats[:, None] * C + cols[None, :], acc.to(DW.dtype.element_ty), mask=out_mask)
    if HAS_BIAS:
        if pid_n == 0:  # every column block summed the same dPre; the first one stores it
            tl.store(DB + feats, db_col.to(DB.dtype.element_ty), mask=feat_ok)


# ----------------------------------------------------------------------------- autotuning


def matmul_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


def config_label(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"BM{k['BLOCK_M']}-BN{k['BLOCK_N']}-BK{k['BLOCK_K']}-w{cfg.num_warps}-s{cfg.num_stages}"


INTERPRETER_CONFIG = matmul_config(64, 64, 64, 4, 1)  # large tiles: fewer interpreted steps

# Survivors of the static report (sm_80 and sm_90, bf16, 0 spill bytes, <= 131 KB shared).
# Expected (unmeasured): 128x128 tiles suit gpt2 sizes; the 64-wide ones give more programs
# to fill 108/132 SMs at small N or F. The autotuner picks among them on the GPU.
DLN_CONFIGS = [
    matmul_config(128, 128, 64, 8, 3),
    matmul_config(128, 64, 64, 4, 4),
    matmul_config(64, 128, 64, 4, 4),
    matmul_config(64, 64, 64, 4, 4),
]
# The GELU' prologue runs on the (features, rows) A tile: with BLOCK_K = 64 the larger tiles
# needed > 255 registers on sm_80 and spilled 360-400 bytes, so they use BLOCK_K = 32.
DW_CONFIGS = [
    matmul_config(128, 128, 32, 8, 3),
    matmul_config(128, 64, 32, 4, 4),
    matmul_config(64, 128, 32, 4, 4),
    matmul_config(64, 64, 64, 4, 4),
]

def _pick(configs):
    return [INTERPRETER_CONFIG] if os.environ.get("TRITON_INTERPRET") == "1" else configs


_dln_matmul = triton.autotune(configs=_pick(DLN_CONFIGS), key=["F", "C", "N_BUCKET"])(_dln_matmul_kernel)
_dw_matmul = triton.autotune(configs=_pick(DW_CONFIGS), key=["F", "C", "N_BUCKET"])(_dw_matmul_kernel)


def n_bucket(n: int) -> int:
    """Autotune key for the row count: a new power of two re-tunes, any other N does not."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- launchers


def dln_matmul(dy: torch.Tensor, pre: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """dLN = (dy * GELU'(pre)) @ weight in fp32; dy, pre: (N, F) contiguous; weight (F, C)."""
    N, F = dy.shape
    C = weight.shape[1]
    dln = torch.empty(N, C, dtype=torch.float32, device=dy.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)

    _dln_matmul[grid](
        dy, dy if pre is None else pre, weight, dln, N, F, C, n_bucket(N),
        GELU=pre is not None, DOT_PRECISION=dot_precision(dy.dtype),
    )
    return dln


def dw_matmul(dy, pre, x, mean, rstd, ln_weight, ln_bias, *, weight_dtype, with_bias: bool):
    """(dW, db or None): dW = dPre^T @ LN(x) with LN recomputed on load; db = rows' sum of dPre."""
    N, F = dy.shape
    C = x.shape[1]
    dw = torch.empty(F, C, dtype=weight_dtype, device=dy.device)
    db = torch.empty(F, dtype=weight_dtype, device=dy.device) if with_bias else None

    def grid(meta):
        return (triton.cdiv(F, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)

    _dw_matmul[grid](
        dy, dy if pre is None else pre, x, mean, rstd, ln_weight,
        ln_weight if ln_bias is None else ln_bias, dw, dw if db is None else db,
        N, F, C, n_bucket(N),
        GELU=pre is not None, HAS_LN_BIAS=ln_bias is not None, HAS_BIAS=with_bias,
        DOT_PRECISION=dot_precision(dy.dtype),
    )
    return dw, db
