"""Gradient matmuls of `layernorm_linear` (the math is in `tsfast.kernels.layernorm_gelu`).

Two tiled matmuls whose A operand is dPre = dY * GELU'(pre), computed in registers as the
dY and pre tiles load (dPre is never written to memory):

    dLN = dPre @ W                (N, F) @ (F, C) -> (N, C), fp32 out, K = F
    dW  = dPre^T @ LN(x)          (F, N) @ (N, C) -> (F, C), K = N, LN recomputed on load
    db  = sum_rows dPre           the same pass as dW: every dW program sums its dPre tile
                                  over rows; the programs of the first C column block store it

The shared Triton helpers (tanh-GELU, its derivative, grouped tile order) live here so that
the forward module can import them without a circular import.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SQRT_2_OVER_PI = 0.7978845608028654
GELU_CUBIC = 0.044715


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
    # Out-of-range rows/columns are clamped (wrapped) for the loads and masked at the store.
    rows_in = (rows % N).to(tl.int64)
    cols_in = cols % C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, F, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < F
        dpre = _dpre_tile(DY, Pre, rows_in[:, None] * F + ks[None, :], k_ok[None, :], GELU)
        w = tl.load(W + ks[:, None] * C + cols_in[None, :], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(dpre.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    out_mask = (rows < N)[:, None] & (cols < C)[None, :]
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
    feats_in = feats % F
    cols_in = cols % C
    gamma = tl.load(LnW + cols_in).to(tl.float32)
    if HAS_LN_BIAS:
        beta = tl.load(LnB + cols_in).to(tl.float32)
    else:
        beta = tl.zeros_like(gamma)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, N, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        ks64 = ks.to(tl.int64)
        # Rows past N load dY = 0, so they add nothing whatever LN(x) is there.
        dpre = _dpre_tile(DY, Pre, ks64[:, None] * F + feats_in[None, :], k_ok[:, None], GELU)
        if HAS_BIAS:
            db += tl.sum(dpre, axis=0)
        mean = tl.load(Mean + ks, mask=k_ok, other=0.0)
        rstd = tl.load(Rstd + ks, mask=k_ok, other=0.0)
        x = tl.load(X + ks64[:, None] * C + cols_in[None, :], mask=k_ok[:, None], other=0.0)
        xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        acc = tl.dot(tl.trans(dpre.to(x.dtype)), xn.to(x.dtype), acc, input_precision=DOT_PRECISION)
    out_mask = (feats < F)[:, None] & (cols < C)[None, :]
    tl.store(DW + feats[:, None] * C + cols[None, :], acc.to(DW.dtype.element_ty), mask=out_mask)
    if HAS_BIAS:
        if pid_n == 0:  # every column block summed the same dPre; the first one stores it
            tl.store(DB + feats, db.to(DB.dtype.element_ty), mask=feats < F)


# ----------------------------------------------------------------------------- autotuning


def matmul_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


def config_label(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"BM{k['BLOCK_M']}-BN{k['BLOCK_N']}-BK{k['BLOCK_K']}-w{cfg.num_warps}-s{cfg.num_stages}"


INTERPRETER_CONFIG = matmul_config(64, 64, 64, 4, 1)  # large tiles: fewer interpreted steps

# Survivors of the static report (sm_80 and sm_90, bf16, 0 spill bytes); see DLN/DW lists.
DLN_CONFIGS = [
    matmul_config(128, 128, 64, 8, 3),
    matmul_config(128, 64, 64, 4, 4),
    matmul_config(64, 128, 64, 4, 4),
    matmul_config(64, 64, 64, 4, 4),
]
# K = N is long here and the output (F, C) is small, so narrower tiles keep the SMs busy.
DW_CONFIGS = [
    matmul_config(128, 128, 64, 8, 3),
    matmul_config(128, 64, 64, 4, 4),
    matmul_config(64, 128, 64, 4, 4),
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
