"""Backward kernels of the LayerNorm-GELU family (the math is in `tsfast.kernels.layernorm_gelu`).

The LayerNorm backward (`layer_norm_backward`), shared by both backward variants of
`layernorm_linear` and by `layer_norm`, and the "prologue" variant's gradient matmuls: two
tiled matmuls whose A operand is dPre = dY * GELU'(pre), computed in registers as the
dY and pre tiles load (dPre is never written to memory):

    dLN = dPre @ W                (N, F) @ (F, C) -> (N, C), fp32 out, K = F
    dW  = dPre^T @ LN(x)          (F, N) @ (N, C) -> (F, C), K = N, LN recomputed on load
    db  = sum_rows dPre           the same pass as dW, as dPre^T @ ones on the tensor cores;
                                  the programs of the first C column block store it

In dW only the per-row part of LN, xhat = (x - mean) rstd, is recomputed on load; gamma and
beta are per output column, so the epilogue applies them once:
dW_fc = sum_i dPre_if (xhat_ic gamma_c + beta_c) = gamma_c (dPre^T xhat)_fc + beta_c db_f.
Applying them per tile kept two broadcast (K, N) fp32 tiles alive in registers (spills).

Dtypes: the matmul operands are cast to the weight's dtype right before `tl.dot` (under
autocast x, gamma, beta stay fp32 while W is bf16/fp16, as torch's autocast runs layer_norm
in fp32 and only the linear in 16 bits); each gradient comes back in its own input's dtype.

The shared Triton helpers (tanh-GELU, its derivative, grouped tile order) live here so that
the forward module can import them without a circular import.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tsfast.kernels.precision import dot_precision

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
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision (tsfast.kernels.precision)
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
    X,  # (N, C) the LayerNorm input, contiguous (its own dtype: fp32 under autocast)
    Mean,  # (N,) fp32 row means
    Rstd,  # (N,) fp32 row reciprocal standard deviations
    LnW,  # (C,) LayerNorm gamma
    LnB,  # (C,) LayerNorm beta (read only when HAS_LN_BIAS)
    DW,  # (F, C) out: weight gradient, in the weight's dtype (also the tl.dot operand dtype)
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
    ones = tl.full((BLOCK_K, 16), 1.0, dtype=DW.dtype.element_ty)
    db = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for k in range(0, N, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        ks64 = ks.to(tl.int64)
        # dY^T tile loaded as (features, rows) so dPre is computed in the A operand's layout.
        # Rows past N load dY = 0, so they add nothing whatever x is there.
        dpre_t = _dpre_tile(DY, Pre, feats[:, None] + ks64[None, :] * F, feat_ok[:, None] & k_ok[None, :], GELU)
        dpre_t = dpre_t.to(DW.dtype.element_ty)
        mean = tl.load(Mean + ks, mask=k_ok, other=0.0)
        rstd = tl.load(Rstd + ks, mask=k_ok, other=0.0)
        x = tl.load(X + ks64[:, None] * C + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # gamma and beta are per output column: applied once in the epilogue, not per tile.
        xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
        acc = tl.dot(dpre_t, xhat.to(DW.dtype.element_ty), acc, input_precision=DOT_PRECISION)
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


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # (N, C) LayerNorm input, contiguous
    DY,  # (N, C) gradient with respect to LayerNorm's output (any float dtype), contiguous
    LnW,  # (C,) gamma
    LnB,  # (C,) beta (read only when WRITE_LN and HAS_LN_BIAS)
    Mean,  # (N,) fp32 row means
    Rstd,  # (N,) fp32 row reciprocal standard deviations
    DX,  # (N, C) out: input gradient, in x's dtype
    LnOut,  # (N, C) out: LN(x) in its own dtype, for a dW GEMM (written only when WRITE_LN)
    DGammaPart,  # (P, C) fp32 out: this program's partial sum of dY * xhat
    DBetaPart,  # (P, C) fp32 out: this program's partial sum of dY
    N, C, rows_per_program,
    HAS_LN_BIAS: tl.constexpr, WRITE_LN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    gamma = tl.load(LnW + cols, mask=mask, other=0.0).to(tl.float32)
    dgamma = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dbeta = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, min(rows_per_program, N - first)):
        row = first + i
        offs = row * C + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        g = dy * gamma
        mean_g = tl.sum(g, axis=0) / C
        mean_gx = tl.sum(g * xhat, axis=0) / C
        tl.store(DX + offs, (rstd * (g - mean_g - xhat * mean_gx)).to(DX.dtype.element_ty), mask=mask)
        dgamma += dy * xhat
        dbeta += dy
        if WRITE_LN:  # x and xhat are in registers already: LN(x) costs only its store
            ln = xhat * gamma
            if HAS_LN_BIAS:
                ln += tl.load(LnB + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(LnOut + offs, ln.to(LnOut.dtype.element_ty), mask=mask)
    tl.store(DGammaPart + pid * C + cols, dgamma, mask=mask)
    tl.store(DBetaPart + pid * C + cols, dbeta, mask=mask)


@triton.jit
def _column_sum_kernel(
    Part,  # (P, C) fp32 per-program partial sums, contiguous
    Out,  # (C,) out: column sums, in the parameter's dtype
    P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p in range(0, P, BLOCK_P):
        ps = p + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & (cols < C)[None, :]
        acc += tl.load(Part + ps[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=cols < C)


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
# fp32 operands (TF32 dots) take twice the bytes a tile: BLOCK_K = 64 with 3-4 stages needs
# 164-196 KB of shared memory (over an A100's 163 KB a block), and 4-warp 128-wide tiles
# need 184-254 registers. These compile for sm_80 and sm_90 with 0 spills, 33-118 KB shared
# (static report). One list serves all three matmuls.
FP32_CONFIGS = [
    matmul_config(128, 128, 32, 8, 3),
    matmul_config(128, 64, 32, 8, 3),
    matmul_config(64, 128, 32, 8, 3),
    matmul_config(64, 64, 32, 4, 3),
]
# fp32 with "ieee" dots (PyTorch's default: TF32 off) runs on FMA units, whose operand
# layouts need more registers: of FP32_CONFIGS, dW's 128x64 and 64x128 spilled 64-88 bytes
# on sm_80 and dLN's 64x64 8 bytes on sm_90. These three are clean for all three matmuls.
IEEE_CONFIGS = [
    matmul_config(128, 128, 32, 8, 3),
    matmul_config(128, 64, 16, 8, 3),
    matmul_config(64, 64, 16, 4, 3),
]


def autotuned(kernel, configs, *, operand: str, autocast_configs=None):
    """`kernel` autotuned over `configs` for 16-bit dot operands, FP32_CONFIGS / IEEE_CONFIGS
    for fp32 ones (the dtype of argument `operand`) with TF32 / "ieee" dots, and
    `autocast_configs` (default `configs`) when the kernel's X is fp32 but the operands are
    not; one pinned config under the interpreter. The tuning key holds every tensor's dtype
    (Triton adds them) and the dot precision, so each of these cases is tuned apart."""
    key = ["F", "C", "N_BUCKET", "DOT_PRECISION"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton.autotune(configs=[INTERPRETER_CONFIG], key=key)(kernel)
    lists = {"16-bit": configs, "tf32": FP32_CONFIGS, "ieee": IEEE_CONFIGS, "autocast": autocast_configs or configs}

    def prune(candidates, named_args, **kwargs):
        if named_args[operand].dtype == torch.float32:
            kind = "tf32" if kwargs["DOT_PRECISION"] == "tf32" else "ieee"
        elif "X" in named_args and named_args["X"].dtype == torch.float32:
            kind = "autocast"
        else:
            kind = "16-bit"
        keep = {id(c) for c in lists[kind]}
        return [c for c in candidates if id(c) in keep]

    every = list({id(c): c for configs_ in lists.values() for c in configs_}.values())
    return triton.autotune(configs=every, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_dln_matmul = autotuned(_dln_matmul_kernel, DLN_CONFIGS, operand="W")
_dw_matmul = autotuned(_dw_matmul_kernel, DW_CONFIGS, operand="DW")


def n_bucket(n: int) -> int:
    """Autotune key for the row count: a new power of two re-tunes, any other N does not."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def row_warps(block_c: int, elem_bytes: int) -> int:
    """Warps for a one-row-per-program kernel: 16 bytes a thread per load (128-bit)."""
    return max(1, min(16, block_c * elem_bytes // (16 * 32)))


COLUMN_SUM_BLOCKS = {"BLOCK_P": 32, "BLOCK_C": 128}


def num_partials(n_rows: int, device: torch.device) -> int:
    """Programs of a row-reduction pass: a few per SM keeps the partial buffer small."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 8))


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
        GELU=pre is not None, DOT_PRECISION=dot_precision(weight.dtype, dy.device),
    )
    return dln


def dw_matmul(dy, pre, x, mean, rstd, ln_weight, ln_bias, *, weight_dtype, bias_dtype=None):
    """(dW, db or None): dW = dPre^T @ LN(x) with LN recomputed on load; db = rows' sum of dPre.
    dW in `weight_dtype` (the dot operands too), db in `bias_dtype` (None: no bias, no db)."""
    N, F = dy.shape
    C = x.shape[1]
    dw = torch.empty(F, C, dtype=weight_dtype, device=dy.device)
    db = None if bias_dtype is None else torch.empty(F, dtype=bias_dtype, device=dy.device)

    def grid(meta):
        return (triton.cdiv(F, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)

    _dw_matmul[grid](
        dy, dy if pre is None else pre, x, mean, rstd, ln_weight,
        ln_weight if ln_bias is None else ln_bias, dw, dw if db is None else db,
        N, F, C, n_bucket(N),
        GELU=pre is not None, HAS_LN_BIAS=ln_bias is not None, HAS_BIAS=db is not None,
        DOT_PRECISION=dot_precision(weight_dtype, dy.device),
    )
    return dw, db


def column_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum over the rows of an fp32 partial-sum buffer (P, C), in a fixed order, as `dtype`."""
    P, C = part.shape
    out = torch.empty(C, dtype=dtype, device=part.device)
    _column_sum_kernel[(triton.cdiv(C, COLUMN_SUM_BLOCKS["BLOCK_C"]),)](part, out, P, C, **COLUMN_SUM_BLOCKS)
    return out


def layer_norm_backward(x, dy, ln_weight, ln_bias, mean, rstd, *, ln_out_dtype=None):
    """(dx, dgamma, dbeta (None without ln_bias), LN(x) or None) for LayerNorm rows x (N, C), contiguous.

    dy (N, C) contiguous, any float dtype; dx in x's dtype, dgamma and dbeta in gamma's and
    beta's. With `ln_out_dtype`, the same pass also writes LN(x) in that dtype (what a dW GEMM
    needs), for the cost of one store: x and xhat are in registers already.
    """
    N, C = x.shape
    P = num_partials(N, x.device)
    dx = torch.empty_like(x)
    ln_out = None if ln_out_dtype is None else torch.empty(N, C, dtype=ln_out_dtype, device=x.device)
    dgamma_part = torch.empty(P, C, dtype=torch.float32, device=x.device)
    dbeta_part = torch.empty_like(dgamma_part)
    block_c = triton.next_power_of_2(C)
    _layer_norm_bwd_kernel[(P,)](
        x, dy, ln_weight, ln_weight if ln_bias is None else ln_bias, mean, rstd, dx,
        dx if ln_out is None else ln_out, dgamma_part, dbeta_part, N, C, triton.cdiv(N, P),
        HAS_LN_BIAS=ln_bias is not None, WRITE_LN=ln_out is not None,
        BLOCK_C=block_c, num_warps=row_warps(block_c, max(dy.element_size(), x.element_size())),
    )
    dbeta = None if ln_bias is None else column_sum(dbeta_part, ln_bias.dtype)
    return dx, column_sum(dgamma_part, ln_weight.dtype), dbeta, ln_out


def layernorm_linear_backward_prologue(dy, x, mean, rstd, ln_weight, ln_bias, weight, pre, *,
                                       bias=None, input_grads=True, weight_grads=True):
    """(dx, dgamma, dbeta, dW, db) with dPre recomputed in both matmuls' prologues.

    dy, x, pre contiguous, N >= 1; arguments and results as
    `tsfast.kernels.layernorm_gelu.layernorm_linear_backward`, which prepares them.
    """
    dx = dgamma = dbeta = dw = db = None
    if input_grads:
        dln = dln_matmul(dy, pre, weight)
        dx, dgamma, dbeta, _ = layer_norm_backward(x, dln, ln_weight, ln_bias, mean, rstd)
    if weight_grads:
        dw, db = dw_matmul(dy, pre, x, mean, rstd, ln_weight, ln_bias, weight_dtype=weight.dtype,
                           bias_dtype=None if bias is None else bias.dtype)
    return dx, dgamma, dbeta, dw, db
