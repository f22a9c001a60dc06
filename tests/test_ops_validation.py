"""Bad input: each op rejects it with a ValueError/TypeError naming the argument, before
either backend runs, identically under "torch" and "triton" (the interpreter: no kernel runs,
so these tests are fast)."""

import pytest
import torch

from tsfast import ops
from tsfast.ops import _checks

B, H, T, D = 2, 2, 5, 16
N, C, F, V = 6, 8, 12, 20


def _r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _attn(q=None, k=None, v=None, cos="tables", sin="tables", **kw):
    q = _r(B, H, T, D) if q is None else q
    k = _r(B, H, T, D) if k is None else k
    v = _r(B, H, T, D) if v is None else v
    tables = ops.rope_cos_sin(k.shape[2] if k.dim() == 4 else T, D)
    cos = tables[0] if isinstance(cos, str) else cos
    sin = tables[1] if isinstance(sin, str) else sin
    return lambda: ops.rope_attention(q, k, v, cos, sin, **kw)


def _lnl(x=None, ln_weight="ok", ln_bias="ok", weight=None, bias="ok", **kw):
    x = _r(N, C) if x is None else x
    ln_weight = _r(C) if isinstance(ln_weight, str) else ln_weight
    ln_bias = _r(C) if isinstance(ln_bias, str) else ln_bias
    weight = _r(F, C) if weight is None else weight
    bias = _r(F) if isinstance(bias, str) else bias
    return lambda: ops.layernorm_linear(x, ln_weight, ln_bias, weight, bias, **kw)


def _ce(logits=None, targets=None, **kw):
    logits = _r(N, V) if logits is None else logits
    targets = torch.randint(0, V, (N,)) if targets is None else targets
    return lambda: ops.cross_entropy(logits, targets, **kw)


def _lce(h=None, weight=None, targets=None, **kw):
    h = _r(N, C) if h is None else h
    weight = _r(V, C) if weight is None else weight
    targets = torch.randint(0, V, (N,)) if targets is None else targets
    return lambda: ops.linear_cross_entropy(h, weight, targets, **kw)


def _out_of_range(value):
    t = torch.randint(0, V, (N,))
    t[N // 2] = value
    return t


# (id, call factory, exception type, a regex the message must match: the argument's name)
CASES = [
    ("q_not_4d", lambda: _attn(q=_r(B * H, T, D)), ValueError, r"^q must be 4-D"),
    ("q_not_tensor", lambda: _attn(q=[[1.0]]), TypeError, r"^q must be a torch.Tensor"),
    ("q_int", lambda: _attn(q=torch.ones(B, H, T, D, dtype=torch.int32)), TypeError, r"^q must be float32"),
    ("k_dtype_differs", lambda: _attn(k=_r(B, H, T, D, dtype=torch.float16)), TypeError,
     r"q,k,v must share one dtype.*k=torch.float16"),
    ("v_device_differs", lambda: _attn(v=_r(B, H, T, D, device="meta")), ValueError,
     r"q,k,v must share one device.*v=meta"),
    ("k_shape_differs", lambda: _attn(k=_r(B, H + 1, T, D)), ValueError, r"q, k, v shapes do not match"),
    ("head_dim_odd", lambda: _attn(q=_r(B, H, T, 7), k=_r(B, H, T, 7), v=_r(B, H, T, 7), cos=None, sin=None),
     ValueError, r"^head dim D must be even.*got D=7"),
    ("q_longer_than_k", lambda: _attn(q=_r(B, H, T + 2, D)), ValueError, r"T_q <= T_k"),
    ("q_last_dim_strided", lambda: _attn(q=_r(B, H, D, T).transpose(-1, -2)), ValueError,
     r"q must have a contiguous last dim"),
    ("cos_without_sin", lambda: _attn(sin=None), ValueError, r"cos and sin must both"),
    ("cos_float64", lambda: _attn(cos=ops.rope_cos_sin(T, D)[0].double()), TypeError,
     r"^cos must be a float32 tensor"),
    ("sin_wrong_shape", lambda: _attn(sin=_r(T, D)), ValueError, r"^sin must have shape \(T_k, D/2\)"),
    ("cos_on_other_device", lambda: _attn(cos=torch.empty(T, D // 2, device="meta")), ValueError,
     r"^cos is on meta"),
    ("dropout_out_of_range", lambda: _attn(dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("doc_ids_float", lambda: _attn(doc_ids=torch.zeros(B, T)), TypeError, r"^doc_ids must be an int32 or int64"),
    ("doc_ids_shape", lambda: _attn(doc_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError,
     r"^doc_ids must have shape \(B, T_k\) = \(2, 5\)"),
    ("doc_ids_device", lambda: _attn(doc_ids=torch.zeros(B, T, dtype=torch.long, device="meta")), ValueError,
     r"^doc_ids is on meta"),
    ("doc_ids_decreasing", lambda: _attn(doc_ids=torch.tensor([[0, 0, 1, 1, 2], [0, 1, 2, 1, 3]])), ValueError,
     r"^doc_ids must be non-decreasing.*row 1 goes from 2 to 1 at position 3"),
    ("x_int", lambda: _lnl(x=torch.ones(N, C, dtype=torch.int64)), TypeError, r"^x must be float32"),
    ("ln_weight_shape", lambda: _lnl(ln_weight=_r(C + 1)), ValueError, r"^ln_weight must have shape \(8,\)"),
    ("ln_bias_device", lambda: _lnl(ln_bias=torch.empty(C, device="meta")), ValueError, r"^ln_bias is on meta"),
    ("weight_shape", lambda: _lnl(weight=_r(F, C + 2)), ValueError, r"^weight must have shape \(F, C=8\)"),
    ("bias_shape", lambda: _lnl(bias=_r(F - 1)), ValueError, r"^bias must have shape \(12,\)"),
    ("weight_dtype_differs", lambda: _lnl(weight=_r(F, C, dtype=torch.float16)), TypeError,
     r"must share one dtype.*weight=torch.float16"),
    ("weight_device_differs", lambda: _lnl(weight=torch.empty(F, C, device="meta"), bias=None), ValueError,
     r"x,weight must share one device"),
    ("activation_unknown", lambda: _lnl(activation="relu"), ValueError, r"^activation must be None or 'gelu_tanh'"),
    ("eps_not_positive", lambda: _lnl(eps=0.0), ValueError, r"^eps must be positive"),
    ("layer_norm_bias_dtype", lambda: (lambda: ops.layer_norm(_r(N, C), _r(C), _r(C, dtype=torch.float64))),
     TypeError, r"x,weight,bias must share one dtype.*bias=torch.float64"),
    ("layer_norm_weight_shape", lambda: (lambda: ops.layer_norm(_r(N, C), _r(C - 1), None)), ValueError,
     r"^ln_weight must have shape"),
    ("logits_3d", lambda: _ce(logits=_r(2, N, V)), ValueError, r"^logits must be 2-D"),
    ("targets_float", lambda: _ce(targets=torch.zeros(N)), TypeError, r"^targets must be an int64"),
    ("targets_shape", lambda: _ce(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError,
     r"^targets must have shape \(6,\)"),
    ("targets_device", lambda: _ce(targets=torch.empty(N, dtype=torch.long, device="meta")), ValueError,
     r"^targets are on meta"),
    ("targets_too_big", lambda: _ce(targets=_out_of_range(V)), ValueError, r"^targets must lie in \[0, 20\)"),
    ("targets_negative", lambda: _ce(targets=_out_of_range(-1)), ValueError, r"^targets must lie in \[0, 20\)"),
    ("reduction_unknown", lambda: _ce(reduction="avg"), ValueError, r"^reduction must be"),
    ("h_3d", lambda: _lce(h=_r(1, N, C)), ValueError, r"^h must be 2-D"),
    ("lce_weight_width", lambda: _lce(weight=_r(V, C + 1)), ValueError, r"^weight must have shape \(V, C=8\)"),
    ("lce_dtype_differs", lambda: _lce(weight=_r(V, C, dtype=torch.float16)), TypeError,
     r"h,weight must share one dtype"),
    ("lce_targets_out_of_range", lambda: _lce(targets=_out_of_range(V + 5)), ValueError,
     r"^targets must lie in \[0, 20\) or equal ignore_index=-100; got values in \[\d+, 25\]"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make_call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_alike(monkeypatch, backend, make_call, error, match):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    call = make_call()
    with ops.use(backend), pytest.raises(error, match=match) as info:
        call()
    assert type(info.value) is error  # not BackendUnavailable or a kernel's own error


def test_ignore_index_targets_pass_the_range_check():
    targets = _out_of_range(-100)
    _checks.check_target_range(targets, V, -100)  # must not raise
    with pytest.raises(ValueError, match="ignore_index=-1"):
        _checks.check_target_range(targets, V, -1)
