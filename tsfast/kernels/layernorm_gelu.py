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

Two backward variants (`layernorm_linear_backward(..., variant=...)`), both candidates of
the measured selection: "prologue" computes dPre in the prologue of both gradient matmuls
(layernorm_gelu_backward.py) and never stores it; dW recomputes xhat on load (gamma, beta in
its epilogue) and sums db in the same pass. "dpre" (layernorm_gelu_dpre.py) writes dPre once
and runs two cuBLAS GEMMs. In both, a per-row kernel then gives dx, and per-program partial
sums of dgamma/dbeta that a second kernel adds up in a fixed order: deterministic, no atomics.

Dtypes follow torch's autocast, which runs layer_norm in fp32 and the linear in 16 bits:
x, gamma, beta may be fp32 while W, b are bf16/fp16. Statistics and normalisation are fp32,
the normalised tile is rounded to W's dtype only as the dot operand, y is in W's dtype, and
every gradient comes back in its own input's dtype. fp32 dots use TF32 when PyTorch's fp32
matmul setting allows it (tsfast.kernels.precision).

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
    COLUMN_SUM_BLOCKS,
    DLN_CONFIGS,
    DW_CONFIGS,
    FP32_CONFIGS,
    IEEE_CONFIGS,
    _column_sum_kernel,
    _dln_matmul_kernel,
    _dw_matmul_kernel,
    _gelu_tanh,
    _grouped_tile,
    _layer_norm_bwd_kernel,
    autotuned,
    config_label,
    layer_norm_backward,
    layernorm_linear_backward_prologue,
    matmul_config,
    n_bucket,
    row_warps,
)
from tsfast.kernels.layernorm_gelu_dpre import (
    _dpre_kernel,
    dpre_config,
    layernorm_linear_backward_dpre,
)
from tsfast.kernels.precision import dot_precision

__all__ = [
    "BACKWARD_VARIANTS", "layer_norm_backward", "layer_norm_forward", "layernorm_linear_backward",
    "layernorm_linear_backward_dpre", "layernorm_linear_backward_prologue", "layernorm_linear_forward",
    "report_cases",
]

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
    W,  # (F, C) linear weight, contiguous; its dtype is the dot operands' (x may be fp32)
    Bias,  # (F,) linear bias (read only when HAS_BIAS)
    Y,  # (N, F) out: act(LN(x) @ W^T + b), contiguous, in W's dtype
    Pre,  # (N, F) out: pre-activation for the backward (written only when GELU), W's dtype
    N, F, C,
    N_BUCKET,  # next power of two of N (capped): only the autotune key
    HAS_LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision (tsfast.kernels.precision)
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
        # LN in fp32, rounded to the weight's dtype only as the dot operand (autocast's order).
        acc = tl.dot(xn.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + feats_in).to(tl.float32)[None, :]
    out_offs = rows.to(tl.int64)[:, None] * F + feats[None, :]
    out_mask = (rows < N)[:, None] & (feats < F)[None, :]
    if GELU:
        tl.store(Pre + out_offs, acc.to(Pre.dtype.element_ty), mask=out_mask)
        acc = _gelu_tanh(acc)
    tl.store(Y + out_offs, acc.to(Y.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- autotuning

# Survivors of the static report (sm_80 and sm_90, bf16, 0 spill bytes, <= 91 KB shared).
# Expected (unmeasured): 128x128 tiles suit gpt2 sizes; the 64-wide ones give more programs
# to fill 108/132 SMs at small N or F. The autotuner picks among them on the GPU (fp32
# operands: FP32_CONFIGS).
FWD_CONFIGS = [
    matmul_config(128, 128, 64, 8, 3),
    matmul_config(128, 64, 64, 4, 4),
    matmul_config(64, 128, 64, 4, 4),
    matmul_config(64, 64, 64, 4, 4),
]
# Under autocast the fp32 x tiles double the A operand's staging bytes: 128x128x64 then
# needs 255 registers and spills 64 bytes on sm_80, so it gives way to BLOCK_K = 32.
FWD_AUTOCAST_CONFIGS = [matmul_config(128, 128, 32, 8, 3), *FWD_CONFIGS[1:]]
_ln_linear_fwd = autotuned(_ln_linear_fwd_kernel, FWD_CONFIGS, operand="W", autocast_configs=FWD_AUTOCAST_CONFIGS)


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
        num_warps=row_warps(block_c, x2.element_size()),
    )
    return y, mean, rstd



def _ln_linear_forward(x2, mean, rstd, ln_weight, ln_bias, weight, bias, gelu: bool):
    """(y, pre or None): y = act(LN(x2) @ weight^T + bias), LN applied to A tiles on load.
    x2, ln_weight, ln_bias in their own dtype (fp32 under autocast); y and pre in weight's."""
    N, C = x2.shape
    F = weight.shape[0]
    y = torch.empty(N, F, dtype=weight.dtype, device=x2.device)
    pre = torch.empty_like(y) if gelu else None

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)

    _ln_linear_fwd[grid](
        x2, mean, rstd, ln_weight, ln_weight if ln_bias is None else ln_bias, weight,
        weight if bias is None else bias, y, y if pre is None else pre, N, F, C, n_bucket(N),
        HAS_LN_BIAS=ln_bias is not None, HAS_BIAS=bias is not None, GELU=gelu,
        DOT_PRECISION=dot_precision(weight.dtype, x2.device),
    )
    return y, pre


# ----------------------------------------------------------------------------- entry points
# Called by tsfast/ops/layernorm.py, which registers them as torch.library custom ops.


def layernorm_linear_forward(x, ln_weight, ln_bias, weight, bias=None, *, activation=None, eps=1e-5):
    """(y, mean, rstd, pre) of y = act(LN(x) @ weight^T + bias), x (N, C) with any N >= 0.

    Dtypes as under torch's autocast: x, ln_weight, ln_bias in their own dtype (fp32 under
    autocast), the statistics and the normalisation in fp32, the normalised tile rounded to
    weight's dtype for the dot; weight and bias in the compute dtype, y and pre in weight's.
    mean, rstd: (N,) fp32; pre: (N, F) pre-activation, or None without an activation (the
    backward needs it only for GELU'). activation: None or "gelu_tanh".
    """
    x = x.contiguous()
    ln_weight, weight = ln_weight.contiguous(), weight.contiguous()
    ln_bias = None if ln_bias is None else ln_bias.contiguous()
    bias = None if bias is None else bias.contiguous()
    gelu = activation == "gelu_tanh"
    N, F = x.shape[0], weight.shape[0]
    if N == 0:
        mean = torch.empty(0, dtype=torch.float32, device=x.device)
        y = x.new_empty(0, F, dtype=weight.dtype)
        return y, mean, mean.clone(), y.clone() if gelu else None
    _, mean, rstd = _row_stats(x, ln_weight, ln_bias, eps, write_y=False)
    y, pre = _ln_linear_forward(x, mean, rstd, ln_weight, ln_bias, weight, bias, gelu)
    return y, mean, rstd, pre


BACKWARD_VARIANTS = ("prologue", "dpre")


def layernorm_linear_backward(dy, x, mean, rstd, ln_weight, ln_bias, weight, pre, *, bias=None,
                              input_grads=True, weight_grads=True, variant="prologue"):
    """(dx, dgamma, dbeta, dW, db) of y = act(LN(x) @ weight^T + bias), given dy = dL/dy.

    x, mean, rstd, pre as `layernorm_linear_forward` gave or took them; dy (N, F), any
    strides (a stride-0 expanded gradient works); bias: the forward's bias or None (only its
    presence and dtype matter). input_grads: compute dx, dgamma, dbeta; weight_grads: dW,
    db. Each gradient comes back in its own input's dtype; None where not asked for or where
    the input is None. variant (BACKWARD_VARIANTS): "prologue" recomputes dPre = dy * GELU'(pre)
    inside both gradient matmuls (Triton, nothing extra stored); "dpre" writes dPre once and
    runs two cuBLAS GEMMs (tsfast.kernels.layernorm_gelu_dpre says which should win where).
    """
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"unknown layernorm_linear backward variant {variant!r}: choose one of {BACKWARD_VARIANTS}")
    x, ln_weight, weight = x.contiguous(), ln_weight.contiguous(), weight.contiguous()
    ln_bias = None if ln_bias is None else ln_bias.contiguous()
    pre = None if pre is None else pre.contiguous()
    dy = dy.reshape(x.shape[0], weight.shape[0])
    if x.shape[0] == 0:
        zeros = [None if t is None else torch.zeros_like(t) for t in (ln_weight, ln_bias, weight, bias)]
        grads = (torch.empty_like(x), *zeros[:2]) if input_grads else (None,) * 3
        return (*grads, *(zeros[2:] if weight_grads else (None, None)))
    if variant == "dpre":
        return layernorm_linear_backward_dpre(dy, x, mean, rstd, ln_weight, ln_bias, weight, pre, bias=bias,
                                              input_grads=input_grads, weight_grads=weight_grads)
    return layernorm_linear_backward_prologue(dy.contiguous(), x, mean, rstd, ln_weight, ln_bias, weight, pre,
                                              bias=bias, input_grads=input_grads, weight_grads=weight_grads)


def layer_norm_forward(x2, weight, bias, eps: float):
    """(y, mean, rstd) of LayerNorm over the rows of x2 (N, C)."""
    return _row_stats(x2, weight, bias, eps, write_y=True)


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
    """Every kernel and autotune config of this family at the gpt2 and baby_gpu shapes (the
    matmuls in their heaviest variant: GELU, both biases): in bf16; the matmuls also with
    fp32 operands (TF32 dots: FP32_CONFIGS; "ieee" dots: IEEE_CONFIGS) and under autocast
    (fp32 x, gamma, beta with bf16 W: the forward's FWD_AUTOCAST_CONFIGS, dW's bf16 ones)."""
    bf16, fp32 = "*bf16", "*fp32"
    cases = []
    for shape, sizes in REPORT_SHAPES.items():
        bucket = {"N_BUCKET_value": n_bucket(sizes["N"])}
        block_c = triton.next_power_of_2(sizes["C"])
        ln_types = {"X": bf16, "LnW": bf16, "LnB": bf16, "Y": bf16, "Mean": fp32, "Rstd": fp32, "eps": "fp32"}
        for name, write_y in (("layer_norm_fwd", True), ("ln_row_stats", False)):
            warps = row_warps(block_c, 2)
            cases.append(_case(name, _layer_norm_fwd_kernel, shape, ln_types,
                               {"HAS_BIAS": True, "WRITE_Y": write_y, "BLOCK_C": block_c},
                               num_warps=warps, num_stages=1, config=f"BC{block_c}-w{warps}"))
        # layer_norm's own backward; the prologue variant's (dLN in fp32); the dpre variant's,
        # which also writes LN(x) for its dW GEMM.
        for name, dy_type, write_ln in (("layer_norm_bwd", bf16, False), ("ln_linear_ln_bwd", fp32, False),
                                        ("ln_linear_ln_bwd_write_ln", fp32, True)):
            warps = row_warps(block_c, 4 if dy_type == fp32 else 2)
            types = {"X": bf16, "DY": dy_type, "LnW": bf16, "LnB": bf16, "Mean": fp32, "Rstd": fp32, "DX": bf16,
                     "LnOut": bf16, "DGammaPart": fp32, "DBetaPart": fp32}
            cases.append(_case(name, _layer_norm_bwd_kernel, shape, types,
                               {"HAS_LN_BIAS": True, "WRITE_LN": write_ln, "BLOCK_C": block_c},
                               num_warps=warps, num_stages=1, config=f"BC{block_c}-w{warps}"))
        cases.append(_case("ln_column_sum", _column_sum_kernel, shape, {"Part": fp32, "Out": bf16},
                           COLUMN_SUM_BLOCKS, num_warps=4, num_stages=1, config="BP32-BC128-w4"))
        cfg = dpre_config(sizes["F"])
        blocks = {k: v for k, v in cfg.items() if k != "num_warps"}
        for dtype in (bf16, fp32):
            # A contiguous dY: Triton specializes its unit column stride to the constant 1.
            types = {"DY": dtype, "Pre": dtype, "DPre": dtype, "DBPart": fp32, "stride_dy_n_value": sizes["F"],
                     "rows_per_program_value": blocks["BLOCK_R"]}
            cases.append(_case(f"ln_linear_dpre{'' if dtype == bf16 else '_fp32'}", _dpre_kernel, shape, types,
                               {"stride_dy_f": 1, "WRITE_DB": True, **blocks}, num_warps=cfg["num_warps"],
                               num_stages=1, config=f"BR{blocks['BLOCK_R']}-BF{blocks['BLOCK_F']}-w{cfg['num_warps']}"))
        for name, fn, configs, autocast_configs, types, flags in _report_matmuls():
            for suffix, dtypes, cfgs, precision in (
                ("", {}, configs, "tf32"), ("_fp32", {"*bf16": fp32}, FP32_CONFIGS, "tf32"),
                ("_fp32_ieee", {"*bf16": fp32}, IEEE_CONFIGS, "ieee"),
                ("_autocast", {"X": fp32, "LnW": fp32, "LnB": fp32}, autocast_configs, "tf32"),
            ):
                if suffix == "_autocast" and "X" not in types:
                    continue  # dLN never reads x
                typed = {arg: dtypes.get(arg, dtypes.get(t, t)) for arg, t in types.items()}
                for c in cfgs:
                    constexprs = {**flags, "DOT_PRECISION": precision, **c.kwargs}
                    cases.append(_case(name + suffix, fn, shape, {**typed, **bucket}, constexprs,
                                       num_warps=c.num_warps, num_stages=c.num_stages, config=config_label(c)))
    return cases


def _report_matmuls():
    """(name, kernel, bf16 configs, autocast configs, bf16 argument types, flags) of the
    three matmuls."""
    bf16, fp32 = "*bf16", "*fp32"
    return (
        ("ln_linear_fwd", _ln_linear_fwd_kernel, FWD_CONFIGS, FWD_AUTOCAST_CONFIGS,
         {"X": bf16, "Mean": fp32, "Rstd": fp32, "LnW": bf16, "LnB": bf16, "W": bf16, "Bias": bf16,
          "Y": bf16, "Pre": bf16}, {"HAS_LN_BIAS": True, "HAS_BIAS": True, "GELU": True}),
        ("ln_linear_dln", _dln_matmul_kernel, DLN_CONFIGS, DLN_CONFIGS,
         {"DY": bf16, "Pre": bf16, "W": bf16, "DLN": fp32}, {"GELU": True}),
        ("ln_linear_dw", _dw_matmul_kernel, DW_CONFIGS, DW_CONFIGS,
         {"DY": bf16, "Pre": bf16, "X": bf16, "Mean": fp32, "Rstd": fp32, "LnW": bf16, "LnB": bf16,
          "DW": bf16, "DB": bf16}, {"GELU": True, "HAS_LN_BIAS": True, "HAS_BIAS": True}),
    )
