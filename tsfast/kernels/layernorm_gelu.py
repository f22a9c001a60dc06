"""LayerNorm-GELU: LayerNorm fused into a matmul's prologue, bias + tanh-GELU in its epilogue.

Ops (contracts: tsfast/ops/layernorm.py, docs/design.md): `layernorm_linear(x, ln_weight, ln_bias, weight, bias, *,
activation, eps)` = act(LN(x) @ W^T + b) for ln_1 -> c_attn and ln_2 -> c_fc -> GELU, and
the standalone `layer_norm(x, weight, bias, eps)` for ln_f.

Forward, per row i of x (N, C), with gamma, beta (C,), W (F, C), b (F,):

    mean_i = sum_c x_ic / C          var_i = sum_c (x_ic - mean_i)^2 / C     (fp32, two passes
    rstd_i = 1 / sqrt(var_i + eps)                                           over the row in
    xhat_ic = (x_ic - mean_i) rstd_i     LN_ic = xhat_ic gamma_c + beta_c     registers)
    pre_if = sum_c LN_ic W_fc + b_f      y_if = gelu(pre_if)   (or pre_if without activation)
    gelu(z) = z/2 (1 + tanh u) = z sigmoid(2u),   u = sqrt(2/pi) (z + 0.044715 z^3)

`_row_stats` writes mean and rstd (8 bytes a row). The matmul loads raw x tiles and applies
(x - mean) rstd gamma + beta in registers before `tl.dot`, so LN(x) never reaches memory;
bias and GELU run on the fp32 accumulator before the downcast.

Backward, given dY (N, F):

    dPre = dY * gelu'(pre),   gelu'(z) = s + 2 z s (1 - s) u'(z),  s = sigmoid(2u),
                              u'(z) = sqrt(2/pi) (1 + 3 * 0.044715 z^2)
    db_f = sum_i dPre_if      dW_fc = sum_i dPre_if LN_ic      dLN_ic = sum_f dPre_if W_fc
    dbeta_c = sum_i dLN_ic    dgamma_c = sum_i dLN_ic xhat_ic
    g_ic = dLN_ic gamma_c     dx_ic = rstd_i (g_ic - mean_c(g_i) - xhat_ic mean_c(g_i xhat_i))

dPre is computed in the prologue of both gradient matmuls (layernorm_gelu_backward.py) and
never stored; dW recomputes xhat on load (gamma, beta in its epilogue) and sums db in the
same pass. The per-row kernel then gives dx, and per-program partial sums of dgamma/dbeta
that a second kernel adds up in a fixed order: deterministic, no atomics.

What the forward keeps, by bytes (gpt2 c_fc: N=12,288, C=768, F=3,072, bf16): storing pre
costs one write (2NF = 75 MB) plus one read in each gradient matmul (150 MB), about 0.07 ms
at an H100's ~3.3 TB/s. Recomputing it would redo LN(x) @ W^T (2NFC = 58 GFLOP, about
0.1 ms at ~600 TFLOPS) inside both gradient matmuls, or materialise it anyway. So pre is
stored (GELU only; without activation pre = y and nothing extra is kept), and the forward
saves x (alive anyway as the residual stream), mean, rstd and pre. Eager PyTorch also keeps
the normalised copy LN(x) (2NC bytes a call); this family never writes it. (Timings are
predictions: no GPU was available; unmeasured.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tsfast.kernels.layernorm_gelu_backward import (
    DLN_CONFIGS,
    DW_CONFIGS,
    _dln_matmul_kernel,
    _dw_matmul_kernel,
    _gelu_tanh,
    _grouped_tile,
    _pick,
    config_label,
    dln_matmul,
    dot_precision,
    dw_matmul,
    matmul_config,
    n_bucket,
)

__all__ = ["layernorm_linear_forward", "layernorm_linear_backward", "layer_norm_forward", "layer_norm_backward", "report_cases"]

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (N, C) input rows, contiguous
    LnW,  # (C,) gamma
    LnB,  # (C,) beta (read only when HAS_BIAS)
    Y,  # (N, C) out: normalised rows (written only when WRITE_Y)
    Mean,  # (N,) fp32 out: row means
    Rstd,  # (N,) fp32 out: row reciprocal standard deviations
    C, eps,
    HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / C + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    if WRITE_Y:
        y = centered * rstd * tl.load(LnW + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(LnB + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_linear_fwd_kernel(
    X,  # (N, C) input rows, contiguous
    Mean,  # (N,) fp32 row means from _layer_norm_fwd_kernel
    Rstd,  # (N,) fp32 row reciprocal standard deviations
    LnW,  # (C,) LayerNorm gamma
    LnB,  # (C,) LayerNorm beta (read only when HAS_LN_BIAS)
    W,  # (F, C) linear weight, contiguous
    Bias,  # (F,) linear bias (read only when HAS_BIAS)
    Y,  # (N, F) out: act(LN(x) @ W^T + b), contiguous
    Pre,  # (N, F) out: pre-activation for the backward (written only when GELU)
    N, F, C,
    N_BUCKET,  # next power of two of N (capped): only the autotune key
    HAS_LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" otherwise (unused)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(F, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/features are wrapped for the loads and masked at the store.
    rows_in = (rows % N).to(tl.int64)
    feats_in = feats % F
    mean = tl.load(Mean + rows_in)
    rstd = tl.load(Rstd + rows_in)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, C, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        x = tl.load(X + rows_in[:, None] * C + ks[None, :], mask=k_ok[None, :], other=0.0)
        gamma = tl.load(LnW + ks, mask=k_ok, other=0.0).to(tl.float32)
        # Columns past C get gamma = beta = 0, so they add nothing to the dot.
        xn = (x.to(tl.float32) - mean[:, None]) * (rstd[:, None] * gamma[None, :])
        if HAS_LN_BIAS:
            xn += tl.load(LnB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w = tl.load(W + feats_in[None, :] * C + ks[:, None], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xn.to(x.dtype), w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + feats_in).to(tl.float32)[None, :]
    out_offs = rows.to(tl.int64)[:, None] * F + feats[None, :]
    out_mask = (rows < N)[:, None] & (feats < F)[None, :]
    if GELU:
        tl.store(Pre + out_offs, acc.to(Pre.dtype.element_ty), mask=out_mask)
        acc = _gelu_tanh(acc)
    tl.store(Y + out_offs, acc.to(Y.dtype.element_ty), mask=out_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # (N, C) LayerNorm input, contiguous
    DY,  # (N, C) gradient with respect to LayerNorm's output (any float dtype), contiguous
    LnW,  # (C,) gamma
    Mean,  # (N,) fp32 row means
    Rstd,  # (N,) fp32 row reciprocal standard deviations
    DX,  # (N, C) out: input gradient, in x's dtype
    DGammaPart,  # (P, C) fp32 out: this program's partial sum of dY * xhat
    DBetaPart,  # (P, C) fp32 out: this program's partial sum of dY
    N, C, rows_per_program,
    BLOCK_C: tl.constexpr,
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

# Survivors of the static report (sm_80 and sm_90, bf16, 0 spill bytes, <= 91 KB shared).
# Expected (unmeasured): 128x128 tiles suit gpt2 sizes; the 64-wide ones give more programs
# to fill 108/132 SMs at small N or F. The autotuner picks among them on the GPU.
FWD_CONFIGS = [
    matmul_config(128, 128, 64, 8, 3),
    matmul_config(128, 64, 64, 4, 4),
    matmul_config(64, 128, 64, 4, 4),
    matmul_config(64, 64, 64, 4, 4),
]
_ln_linear_fwd = triton.autotune(configs=_pick(FWD_CONFIGS), key=["F", "C", "N_BUCKET"])(_ln_linear_fwd_kernel)


def _row_warps(block_c: int, elem_bytes: int) -> int:
    """Warps for a one-row-per-program kernel: 16 bytes a thread per load (128-bit)."""
    return max(1, min(16, block_c * elem_bytes // (16 * 32)))


COLUMN_SUM_BLOCKS = {"BLOCK_P": 32, "BLOCK_C": 128}


def _num_partials(n_rows: int, device: torch.device) -> int:
    """Programs of the LayerNorm backward: a few per SM keeps the partial buffer small."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 8))


# ----------------------------------------------------------------------------- launchers


def _row_stats(x2, ln_weight, ln_bias, eps, *, write_y: bool):
    """(y or None, mean, rstd) of the rows of x2 (N, C) contiguous."""
    N, C = x2.shape
    mean = torch.empty(N, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x2) if write_y else None
    block_c = triton.next_power_of_2(C)
    _layer_norm_fwd_kernel[(N,)](
        x2, ln_weight, ln_weight if ln_bias is None else ln_bias, x2 if y is None else y,
        mean, rstd, C, eps,
        HAS_BIAS=ln_bias is not None, WRITE_Y=write_y, BLOCK_C=block_c,
        num_warps=_row_warps(block_c, x2.element_size()),
    )
    return y, mean, rstd


def _column_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    P, C = part.shape
    out = torch.empty(C, dtype=dtype, device=part.device)
    _column_sum_kernel[(triton.cdiv(C, COLUMN_SUM_BLOCKS["BLOCK_C"]),)](part, out, P, C, **COLUMN_SUM_BLOCKS)
    return out


def _layer_norm_backward(x2, dy2, ln_weight, mean, rstd, *, need_dbeta: bool):
    """(dx, dgamma, dbeta or None) for LayerNorm rows; dy2 (N, C) contiguous, any float dtype."""
    N, C = x2.shape
    P = _num_partials(N, x2.device)
    dx = torch.empty_like(x2)
    dgamma_part = torch.empty(P, C, dtype=torch.float32, device=x2.device)
    dbeta_part = torch.empty_like(dgamma_part)
    block_c = triton.next_power_of_2(C)
    _layer_norm_bwd_kernel[(P,)](
        x2, dy2, ln_weight, mean, rstd, dx, dgamma_part, dbeta_part, N, C, triton.cdiv(N, P),
        BLOCK_C=block_c, num_warps=_row_warps(block_c, dy2.element_size()),
    )
    dbeta = _column_sum(dbeta_part, ln_weight.dtype) if need_dbeta else None
    return dx, _column_sum(dgamma_part, ln_weight.dtype), dbeta


def _ln_linear_forward(x2, mean, rstd, ln_weight, ln_bias, weight, bias, gelu: bool):
    """(y, pre or None): y = act(LN(x2) @ weight^T + bias), LN applied to A tiles on load."""
    N, C = x2.shape
    F = weight.shape[0]
    y = torch.empty(N, F, dtype=x2.dtype, device=x2.device)
    pre = torch.empty_like(y) if gelu else None

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)

    _ln_linear_fwd[grid](
        x2, mean, rstd, ln_weight, ln_weight if ln_bias is None else ln_bias, weight,
        weight if bias is None else bias, y, y if pre is None else pre, N, F, C, n_bucket(N),
        HAS_LN_BIAS=ln_bias is not None, HAS_BIAS=bias is not None, GELU=gelu,
        DOT_PRECISION=dot_precision(x2.dtype),
    )
    return y, pre


# ----------------------------------------------------------------------------- entry points
# Called by tsfast/ops/layernorm.py, which registers them as torch.library custom ops. Rows
# come in as contiguous (N, C) matrices with N > 0; the op module handles shapes and N = 0.


def layernorm_linear_forward(x2, ln_weight, ln_bias, weight, bias, *, gelu: bool, eps: float):
    """(y (N, F), mean (N,), rstd (N,), pre (N, F) or None): y = act(LN(x2) @ W^T + b);
    pre is the pre-activation, written only with GELU (its backward reads it)."""
    _, mean, rstd = _row_stats(x2, ln_weight, ln_bias, eps, write_y=False)
    y, pre = _ln_linear_forward(x2, mean, rstd, ln_weight, ln_bias, weight, bias, gelu)
    return y, mean, rstd, pre


def layernorm_linear_backward(dy2, x2, mean, rstd, ln_weight, ln_bias, weight, pre, *,
                              with_bias: bool, input_grads: bool, weight_grads: bool):
    """(dx, dgamma, dbeta, dw, db), each None where not asked for: `input_grads` asks for
    dx, dgamma, dbeta (dbeta only with an ln_bias), `weight_grads` for dw and db."""
    dx = dgamma = dbeta = dw = db = None
    if input_grads:
        dln = dln_matmul(dy2, pre, weight)
        dx, dgamma, dbeta = _layer_norm_backward(x2, dln, ln_weight, mean, rstd, need_dbeta=ln_bias is not None)
    if weight_grads:
        dw, db = dw_matmul(dy2, pre, x2, mean, rstd, ln_weight, ln_bias,
                           weight_dtype=weight.dtype, with_bias=with_bias)
    return dx, dgamma, dbeta, dw, db


def layer_norm_forward(x2, weight, bias, eps: float):
    """(y, mean, rstd) of LayerNorm over the rows of x2 (N, C)."""
    return _row_stats(x2, weight, bias, eps, write_y=True)


def layer_norm_backward(dy2, x2, weight, bias, mean, rstd):
    """(dx, dgamma, dbeta or None)."""
    return _layer_norm_backward(x2, dy2, weight, mean, rstd, need_dbeta=bias is not None)


# ----------------------------------------------------------------------------- static report

REPORT_SHAPES = {"gpt2": {"N": 12 * 1024, "C": 768, "F": 4 * 768}, "baby_gpu": {"N": 64 * 512, "C": 384, "F": 4 * 384}}


def _case(name, fn, shape, types, constexprs, *, num_warps, num_stages, config):
    """One compilation of `fn` for the static report; ints take the preset's sizes, and
    every pointer and every size divisible by 16 gets the divisibility hint Triton's JIT
    would give it at that shape (`attrs`, keyed by argument index)."""
    sizes = REPORT_SHAPES[shape]
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        signature[arg] = "constexpr" if arg in constexprs else types.get(arg, "i32")
        pointer = signature[arg].startswith("*")
        value = sizes.get(arg, types.get(arg + "_value"))
        if pointer or (signature[arg] == "i32" and value is not None and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "attrs": attrs, "num_warps": num_warps, "num_stages": num_stages, "config": config,
            "shape": shape}


def report_cases() -> list[dict]:
    """Every kernel and autotune config of this family, in bf16, at the gpt2 and baby_gpu
    shapes (the matmuls in their heaviest variant: GELU, both biases)."""
    bf16, fp32 = "*bf16", "*fp32"
    cases = []
    for shape, sizes in REPORT_SHAPES.items():
        bucket = {"N_BUCKET_value": n_bucket(sizes["N"])}
        block_c = triton.next_power_of_2(sizes["C"])
        ln_types = {"X": bf16, "LnW": bf16, "LnB": bf16, "Y": bf16, "Mean": fp32, "Rstd": fp32, "eps": "fp32"}
        for name, write_y in (("layer_norm_fwd", True), ("ln_row_stats", False)):
            warps = _row_warps(block_c, 2)
            cases.append(_case(name, _layer_norm_fwd_kernel, shape, ln_types,
                               {"HAS_BIAS": True, "WRITE_Y": write_y, "BLOCK_C": block_c},
                               num_warps=warps, num_stages=1, config=f"BC{block_c}-w{warps}"))
        for name, dy_type in (("layer_norm_bwd", bf16), ("ln_linear_ln_bwd", fp32)):
            warps = _row_warps(block_c, 4 if dy_type == fp32 else 2)
            types = {"X": bf16, "DY": dy_type, "LnW": bf16, "Mean": fp32, "Rstd": fp32, "DX": bf16,
                     "DGammaPart": fp32, "DBetaPart": fp32}
            cases.append(_case(name, _layer_norm_bwd_kernel, shape, types, {"BLOCK_C": block_c},
                               num_warps=warps, num_stages=1, config=f"BC{block_c}-w{warps}"))
        cases.append(_case("ln_column_sum", _column_sum_kernel, shape, {"Part": fp32, "Out": bf16},
                           COLUMN_SUM_BLOCKS, num_warps=4, num_stages=1, config="BP32-BC128-w4"))
        matmuls = (
            ("ln_linear_fwd", _ln_linear_fwd_kernel, FWD_CONFIGS,
             {"X": bf16, "Mean": fp32, "Rstd": fp32, "LnW": bf16, "LnB": bf16, "W": bf16, "Bias": bf16,
              "Y": bf16, "Pre": bf16}, {"HAS_LN_BIAS": True, "HAS_BIAS": True, "GELU": True}),
            ("ln_linear_dln", _dln_matmul_kernel, DLN_CONFIGS,
             {"DY": bf16, "Pre": bf16, "W": bf16, "DLN": fp32}, {"GELU": True}),
            ("ln_linear_dw", _dw_matmul_kernel, DW_CONFIGS,
             {"DY": bf16, "Pre": bf16, "X": bf16, "Mean": fp32, "Rstd": fp32, "LnW": bf16, "LnB": bf16,
              "DW": bf16, "DB": bf16}, {"GELU": True, "HAS_LN_BIAS": True, "HAS_BIAS": True}),
        )
        for name, fn, configs, types, flags in matmuls:
            for cfg in configs:
                constexprs = {**flags, "DOT_PRECISION": "tf32", **cfg.kwargs}
                cases.append(_case(name, fn, shape, {**types, **bucket}, constexprs,
                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                   config=config_label(cfg)))
    return cases
