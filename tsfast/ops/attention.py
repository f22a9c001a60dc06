"""rope_attention: rotary embedding + causal softmax attention, fused (docs/design.md).

Contract (both backends):

    rope_attention(q, k, v, cos=None, sin=None, *, causal=True, scale=None, dropout_p=0.0,
                   doc_ids=None) -> o                          # (B, H, Tq, D), q's dtype

- q: (B, H, Tq, D); k, v: (B, H, Tk, D), Tq <= Tk: the queries are the last Tq of the Tk key
  positions (decoding with a KV cache), query i sits at position t_i = Tk - Tq + i. One
  dtype (fp32, fp16, bf16; float64 on torch only), last dim contiguous, other strides free
  (views of the fused qkv projection work without copies). D even.
- cos, sin: (Tk, D/2) float32 tables indexed by rotary position, or both None (no rotary,
  learned positions). Rotate-half rotation (tsfast/ops/rotary.py); gradients are with
  respect to the un-rotated q and k.
- o = softmax(rope(q) rope(k)^T * scale + mask) v, scale defaulting to D**-0.5.
- doc_ids: None, or (B, Tk) int32/int64, non-decreasing along T (stories packed in a row;
  in batched decoding, left padding as a document of its own). Query i of row b attends key
  s only when (not causal or s <= t_i) and doc_ids[b, s] == doc_ids[b, t_i], and every
  token's rotary position is its index minus the index of its document's first token in
  the row (`rotary.doc_positions`). None: position = index, no document mask.

Numerics: softmax statistics in fp32; the rotation in fp32 then rounded to the input dtype.

Backends: torch (CPU/MPS, and anything the kernel declines) is SDPA over rotated q and k,
with ATen's CPU flash kernel and a lean backward for the training shape on CPU; Triton is
`tsfast/kernels/rope_attention.py` (FlashAttention-2 with the rotation applied to tiles as
they load), registered below as the custom ops tsfast::rope_attention_fwd / _bwd. The kernel
takes Tq == Tk, D in KERNEL_HEAD_DIMS, no dropout; with doc_ids it skips key blocks wholly
outside the query block's documents and masks only the blocks on a boundary. Under autocast q, k, v are cast to the
autocast dtype (as SDPA's autocast does); cos and sin stay fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsfast.flops import OpCost
from tsfast.ops import _backend
from tsfast.ops._checks import check_float, check_same, dtype_name, float64_declined, wants_grad
from tsfast.ops.rotary import doc_positions, rope_cos_sin, rope_rotate, rotate
from tsfast.ops.selection import Candidate, Family

KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # what the Triton kernel compiles for
BACKWARD_FACTOR = 2.5  # five products in backward (dV, dP, dQ, dK, recomputed QK^T) vs two


# ----------------------------------------------------------------------------- cost


def attention_flops(batch: int, heads: int, q_len: int, head_dim: int, *, causal: bool = True,
                    k_len: int | None = None, pairs: float | None = None) -> float:
    """Forward FLOPs of softmax(Q K^T) V: 4·D per attended (query, key) pair per head.

    Without `pairs`: causal counts T²/2 pairs (the FlashAttention convention); with a KV
    cache (k_len > q_len) q_len·(k_len - q_len) + q_len²/2. `pairs` (per batch, all rows
    together) overrides the count: document masking counts only the pairs it attends."""
    k_len = q_len if k_len is None else k_len
    if pairs is None:
        per_row = q_len * (k_len - q_len) + q_len * q_len / 2 if causal else q_len * k_len
        pairs = batch * per_row
    return 4.0 * heads * pairs * head_dim


def attended_pairs(doc_ids: torch.Tensor, q_len: int, causal: bool) -> int:
    """(query, key) pairs a document mask keeps, over all rows (a host sync: metering only).
    Causal: query t sees pos[t] + 1 keys; otherwise every key of its document."""
    pos = doc_positions(doc_ids)[:, -q_len:]
    if causal:
        return int((pos + 1).sum())
    _, inverse, counts = torch.unique_consecutive(doc_ids.flatten(), return_inverse=True, return_counts=True)
    return int(counts[inverse].view(doc_ids.shape)[:, -q_len:].sum())


def rope_attention_cost(batch: int, heads: int, q_len: int, head_dim: int, *, causal: bool = True,
                        k_len: int | None = None, pairs: float | None = None) -> OpCost:
    fwd = attention_flops(batch, heads, q_len, head_dim, causal=causal, k_len=k_len, pairs=pairs)
    return OpCost(fwd, BACKWARD_FACTOR * fwd, "tflops")


# ----------------------------------------------------------------------------- validation


def _validate(q, k, v, cos, sin, dropout_p, doc_ids) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    check_same("q,k,v", (q, k, v), "dtype")
    check_same("q,k,v", (q, k, v), "device")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, Tq, D = q.shape
    Tk = k.shape[2]
    if Tq > Tk:
        # The queries are the last Tq of the Tk positions (a KV cache), so there cannot be more.
        raise ValueError(f"rope_attention needs T_q <= T_k (queries are the last positions), got T_q={Tq} > T_k={Tk}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if D % 2 or D < 2:
        raise ValueError(f"head dim D must be even (rotate-half rotary), got D={D}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.shape != (Tk, D // 2):
                raise ValueError(f"{name} must have shape (T_k, D/2) = ({Tk}, {D // 2}), got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if doc_ids is not None:
        _validate_doc_ids(doc_ids, B, Tk, q.device)


def _validate_doc_ids(doc_ids, B: int, Tk: int, device: torch.device) -> None:
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"doc_ids must be an int32 or int64 tensor, got {getattr(doc_ids, 'dtype', type(doc_ids).__name__)}")
    if doc_ids.shape != (B, Tk):
        raise ValueError(f"doc_ids must have shape (B, T_k) = ({B}, {Tk}), got {tuple(doc_ids.shape)}")
    if doc_ids.device != device:
        raise ValueError(f"doc_ids is on {doc_ids.device} but q is on {device}")
    # Monotonicity reads values: checked on CPU only (no device sync) and not while tracing.
    if device.type == "cpu" and Tk > 1 and not torch.compiler.is_compiling():
        drops = (doc_ids[:, 1:] < doc_ids[:, :-1]).nonzero()
        if drops.numel():
            b, t = (int(i) for i in drops[0])
            raise ValueError(
                f"doc_ids must be non-decreasing along T (one run of ids per document): row {b} "
                f"goes from {int(doc_ids[b, t])} to {int(doc_ids[b, t + 1])} at position {t + 1}"
            )


# ----------------------------------------------------------------------------- torch path


def _torch_path(q, k, v, cos, sin, doc_ids, causal, scale, dropout_p):
    Tq, Tk = q.shape[-2], k.shape[-2]
    if doc_ids is None and q.device.type == "cpu" and q.dtype == torch.float32 and Tq == Tk and dropout_p == 0.0:
        return _RopeFlashAttentionCPU.apply(q, k, v, cos, sin, causal, scale)
    mask = None
    if doc_ids is not None:
        same = doc_ids[:, None, -Tq:, None] == doc_ids[:, None, None, :]  # (B, 1, Tq, Tk)
        if causal:
            same = same & torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        mask, causal = same, False
        if cos is not None:
            pos = doc_positions(doc_ids)  # (B, Tk): one table row per token, shared by heads
            cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, Tk, D/2)
    if cos is not None:
        q = rope_rotate(q, cos[..., Tk - Tq :, :], sin[..., Tk - Tq :, :])
        k = rope_rotate(k, cos, sin)
    if causal and Tq == 1:
        causal = False  # one query, the last position: it sees every key, no mask to build
    elif causal and Tq != Tk:
        # SDPA's is_causal aligns the mask top-left; a cache needs bottom-right.
        mask, causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, dropout_p=dropout_p)


class _RopeFlashAttentionCPU(torch.autograd.Function):
    """Rotary + causal attention on CPU through ATen's flash kernel, with a lean backward.

    What plain autograd over apply_rope + SDPA costs, and this avoids: the rotated q and k
    are kept for backward (2 x B·H·T·D floats a layer; here q, k, v are saved as the views
    of the fused projection they are, and the rotation is redone in backward, two cheap
    passes), and the gradient of each rotated half goes back through cat/slice backward,
    which fills a zero tensor per half. The output keeps the kernel's (B, T, H, D) memory
    layout, so `o.transpose(1, 2).reshape(B, T, C)` is free. Figures: BENCHMARKS.md.
    """

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, causal, scale):
        qr, kr = (rotate(q, cos, sin), rotate(k, cos, sin)) if cos is not None else (q, k)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qr, kr, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, cos, sin, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, cos, sin, o, lse = ctx.saved_tensors
        qr, kr = (rotate(q, cos, sin), rotate(k, cos, sin)) if cos is not None else (q, k)
        if grad_o.stride(-1) != 1:  # other strides, stride 0 included, the kernel reads as they are
            grad_o = grad_o.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_o, qr, kr, v, o, lse, 0.0, ctx.causal, scale=ctx.scale
        )
        if cos is not None:
            dq, dk = rotate(dq, cos, sin, inverse=True), rotate(dk, cos, sin, inverse=True)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- Triton path
# Opaque custom ops: torch.compile runs the fake versions while tracing and the kernels at run
# time, so the Triton path traces with fullgraph=True (on CPU under TRITON_INTERPRET=1 too).


@torch.library.custom_op("tsfast::rope_attention_fwd", mutates_args=())
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None, doc_ids: torch.Tensor | None, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from tsfast.kernels import rope_attention as kernels

    return kernels.forward(q, k, v, cos, sin, causal, scale, doc_ids=doc_ids)


@_triton_fwd.register_fake
def _(q, k, v, cos, sin, doc_ids, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B * H, T), dtype=torch.float32)


@torch.library.custom_op("tsfast::rope_attention_bwd", mutates_args=())
def _triton_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cos: torch.Tensor | None, sin: torch.Tensor | None, doc_ids: torch.Tensor | None,
                o: torch.Tensor, lse: torch.Tensor, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tsfast.kernels import rope_attention as kernels

    return kernels.backward(do, q, k, v, cos, sin, o, lse, causal, scale, doc_ids=doc_ids)


@_triton_bwd.register_fake
def _(do, q, k, v, cos, sin, doc_ids, o, lse, causal, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, doc_ids, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, doc_ids, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, _dlse):
    q, k, v, cos, sin, doc_ids, o, lse = ctx.saved_tensors
    dq, dk, dv = _triton_bwd(do, q, k, v, cos, sin, doc_ids, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton_path(q, k, v, cos, sin, doc_ids, causal, scale, dropout_p):
    dtype = _backend.autocast_dtype(q.device.type)
    if dtype is not None:  # what autocast does to SDPA: q, k, v in the autocast dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _triton_fwd(q, k, v, cos, sin, doc_ids, bool(causal), scale)[0]


def kernel_declines(q, k, *, dropout_p: float) -> str | None:
    """Why the Triton kernel cannot take this call (None if it can); reads only shapes and dtypes."""
    D = q.shape[-1]
    if D not in KERNEL_HEAD_DIMS:
        return f"head dim {D} is not one of {KERNEL_HEAD_DIMS} (change n_embd/n_head)"
    if q.shape[2] != k.shape[2]:
        return "query and key lengths differ (KV-cache decoding)"
    if dropout_p > 0:
        return "attention dropout is not implemented in the kernel"
    return float64_declined(q)


# ----------------------------------------------------------------------------- candidates
# Under --kernels auto on CUDA the faster of these runs (ops/selection.py); the first of each
# backend is what --kernels triton / torch run.


# Masked calls are timed on stories of this many tokens: the synthetic corpus's stories
# average 131 (39,200 in its train split). The key records only that a mask is given, not
# its documents' lengths, which are data (torch.compile traces the choice as a constant).
BENCH_DOC_TOKENS = 128


def bench_doc_ids(batch: int, length: int, device=None) -> torch.Tensor:
    """(batch, length) int64 doc_ids of BENCH_DOC_TOKENS-token stories packed in each row,
    every row starting at a different point of a story, as packed training rows do (so the
    boundaries fall inside the kernel's blocks, not on their edges)."""
    offsets = torch.arange(batch, device=device)[:, None] * 37 % BENCH_DOC_TOKENS  # (B, 1)
    return (torch.arange(length, device=device)[None, :] + offsets) // BENCH_DOC_TOKENS  # (B, T)


def _bench_inputs(call, device):
    """Random inputs of a call's shape: q, k, v as views of one fused projection (the model's
    layout), with the kernel's cos/sin tables when the call has them, and `bench_doc_ids`
    when it has a document mask."""
    B, H, Tq, Tk, D, causal, rope, docs, dtype, grad = call
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, Tk, 3, H, D, generator=g, device=device).to(getattr(torch, dtype))
    q, k, v = (t.detach().requires_grad_(grad) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    q = q[:, :, Tk - Tq:].detach().requires_grad_(grad)
    cos, sin = rope_cos_sin(Tk, D, device=device) if rope else (None, None)
    doc_ids = bench_doc_ids(B, Tk, device) if docs else None
    return (q, k, v, cos, sin, doc_ids, causal, None, 0.0), ([q, k, v] if grad else [])


FAMILY = Family(
    "rope_attention",
    (
        Candidate("triton", "triton", _triton_path),
        Candidate("torch", "torch", _torch_path),  # rotary, then F.scaled_dot_product_attention
    ),
    fields=("B", "H", "Tq", "Tk", "D", "causal", "rope", "docs", "dtype", "grad"),
    bucketed=("B", "Tq", "Tk"),
    bench_inputs=_bench_inputs,
)


# ----------------------------------------------------------------------------- the op


def rope_attention(q, k, v, cos=None, sin=None, *, causal=True, scale=None, dropout_p=0.0, doc_ids=None):
    """o = softmax(rope(q) @ rope(k)^T * scale + mask) @ v: the contract in the module doc.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); cos, sin: (Tk, D/2) fp32 or None;
    doc_ids: (B, Tk) non-decreasing ints or None. Returns (B, H, Tq, D) in q's dtype."""
    _validate(q, k, v, cos, sin, dropout_p, doc_ids)
    B, H, Tq, D = q.shape
    call = (B, H, Tq, k.shape[2], D, bool(causal), cos is not None, doc_ids is not None, dtype_name(q.dtype),
            wants_grad(q, k, v))
    declined = kernel_declines(q, k, dropout_p=dropout_p)

    def cost():
        pairs = None if doc_ids is None else attended_pairs(doc_ids, Tq, causal)
        return rope_attention_cost(B, H, Tq, D, causal=causal, k_len=k.shape[2], pairs=pairs)

    return _backend.dispatch(FAMILY, q.device, call, declined,
                             (q, k, v, cos, sin, doc_ids, causal, scale, dropout_p), cost)
