"""Backend selection in tsfast.ops: use(), TSFAST_KERNELS, auto, explicit triton, declined
calls, autocast on the Triton path, and no gradient work without grad."""

import logging
import os
import subprocess
import sys

import pytest
import reference64
import torch

from tsfast import ops
from tsfast.ops import _backend


@pytest.fixture(autouse=True)
def _fresh_dispatch_state(monkeypatch):
    monkeypatch.setattr(_backend, "_selected", None)
    monkeypatch.setattr(_backend, "_logged_declines", set())
    monkeypatch.delenv("TSFAST_KERNELS", raising=False)


def _attention_inputs(D=64, T=9, dtype=torch.float32, device="cpu"):
    q, k, v = (torch.randn(2, 3, T, D, dtype=dtype, device=device) for _ in range(3))
    cos, sin = ops.rope_cos_sin(T, D, device=device)
    return q, k, v, cos, sin


def test_use_as_function_and_context_manager_restores():
    assert ops.get_backend() == "auto"
    ops.use("torch")
    assert ops.get_backend() == "torch"
    with ops.use("triton"):
        assert ops.get_backend() == "triton"
        with ops.use("auto"):
            assert ops.get_backend() == "auto"
        assert ops.get_backend() == "triton"
    assert ops.get_backend() == "torch"


def test_use_rejects_unknown_backend_and_keeps_the_old_one():
    ops.use("torch")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'.*auto, triton, torch"):
        ops.use("cuda")
    assert ops.get_backend() == "torch"


def test_env_var_selects_backend_and_use_overrides_it(monkeypatch):
    monkeypatch.setenv("TSFAST_KERNELS", " Torch ")
    assert ops.get_backend() == "torch"
    with ops.use("triton"):
        assert ops.get_backend() == "triton"
    assert ops.get_backend() == "torch"
    monkeypatch.setenv("TSFAST_KERNELS", "fast")
    with pytest.raises(ValueError, match="TSFAST_KERNELS='fast'"):
        ops.get_backend()


def test_auto_on_cpu_runs_the_torch_path():
    q, k, v, cos, sin = _attention_inputs()
    assert not _backend.use_triton("rope_attention", q.device)
    out = ops.rope_attention(q, k, v, cos, sin)
    with ops.use("torch"):
        torch.testing.assert_close(out, ops.rope_attention(q, k, v, cos, sin), rtol=0, atol=0)


def test_explicit_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    # Faked rather than unset: Triton reads TRITON_INTERPRET when it is first imported.
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    ops.use("triton")
    x = torch.randn(4, 8)
    with pytest.raises(ops.BackendUnavailable, match="CUDA GPU.*--kernels auto or torch.*TRITON_INTERPRET=1"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8))


def test_explicit_triton_on_meta_device_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match="on meta"):
        _backend.use_triton("layer_norm", torch.device("meta"))


def test_explicit_triton_routes_to_the_kernel_under_the_interpreter(monkeypatch):
    from tsfast.kernels import rope_attention as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    q, k, v, cos, sin = _attention_inputs(D=16)
    with ops.use("triton"):
        out = ops.rope_attention(q, k, v, cos, sin)
    assert calls == [q.shape]
    want = reference64.rope_attention(q.double(), k.double(), v.double(), cos.double(), sin.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "case, match",
    [
        (dict(D=48), "head dim 48 is not one of"),
        (dict(dropout_p=0.1), "dropout is not implemented"),
        (dict(dtype=torch.float64), "float64 runs on torch only"),
        (dict(T_q=1), "query and key lengths differ"),
    ],
)
def test_declined_call_raises_under_triton_and_goes_to_torch_under_auto(monkeypatch, caplog, case, match):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dropout_p = case.pop("dropout_p", 0.0)
    T_q = case.pop("T_q", None)
    q, k, v, cos, sin = _attention_inputs(**case)
    if T_q is not None:
        q = q[:, :, -T_q:]
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match=match + ".*--kernels auto"):
        ops.rope_attention(q, k, v, cos, sin, dropout_p=dropout_p)

    # auto sends such a call to torch, logging once per (op, reason); CUDA is faked because
    # auto never considers Triton for CPU tensors.
    monkeypatch.setattr(_backend, "triton_missing", lambda: None)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        for _ in range(3):
            assert not _backend.use_triton("rope_attention", cuda, match)
    assert [r.getMessage() for r in caplog.records] == [f"tsfast: rope_attention runs on torch: {match}"]
    assert _backend.use_triton("rope_attention", cuda)


def test_auto_on_cpu_takes_declined_calls_silently(caplog):
    q, k, v, cos, sin = _attention_inputs(D=48)
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        out = ops.rope_attention(q, k, v, cos, sin)
    assert caplog.records == []
    assert out.shape == q.shape


def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(_backend, "triton_missing", lambda: "Triton does not import (ImportError: nope)")
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match="Triton does not import.*--kernels torch"):
        _backend.use_triton("layer_norm", torch.device("cpu"))
    with ops.use("auto"):
        assert not _backend.use_triton("layer_norm", torch.device("cuda"))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_every_op_matches_the_oracle_on_cpu(backend):
    N, C, F, V = 7, 16, 24, 33
    x, lw, lb = torch.randn(N, C), torch.randn(C), torch.randn(C)
    w, b = torch.randn(F, C), torch.randn(F)
    t = torch.randint(0, V, (N,))
    t[2] = -100
    logits, h, wv = torch.randn(N, V).mul_(3), torch.randn(N, C), torch.randn(V, C)
    with ops.use(backend):
        got = [
            ops.layer_norm(x, lw, lb),
            ops.layernorm_linear(x, lw, lb, w, b, activation="gelu_tanh"),
            ops.cross_entropy(logits, t),
            ops.linear_cross_entropy(h, wv, t, reduction="sum"),
        ]
    d = [a.double() for a in (x, lw, lb, w, b, logits, h, wv)]
    want = [
        reference64.layer_norm(d[0], d[1], d[2]),
        reference64.layernorm_linear(d[0], d[1], d[2], d[3], d[4], activation="gelu_tanh"),
        reference64.cross_entropy(d[5], t),
        reference64.linear_cross_entropy(d[6], d[7], t, reduction="sum"),
    ]
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


def test_importing_tsfast_does_not_import_triton():
    code = ("import sys, tsfast, tsfast.ops, tsfast.meter, tsfast.flops, tsfast.model; "
            "bad = [m for m in sys.modules if m == 'triton' or m.startswith(('torch._dynamo', 'tsfast.kernels'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_path_never_loads_a_kernel_module(backend):
    code = f"""
import sys, torch
from tsfast import ops
q = k = v = torch.randn(1, 2, 5, 16)
cos, sin = ops.rope_cos_sin(5, 16)
with ops.use("{backend}"):
    ops.rope_attention(q, k, v, cos, sin, dropout_p=0.1)
    ops.layernorm_linear(torch.randn(3, 8), torch.ones(8), None, torch.randn(4, 8))
    ops.linear_cross_entropy(torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3]))
loaded = [m for m in sys.modules if m == "triton" or m.startswith("tsfast.kernels")]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


def test_triton_path_applies_autocast_like_torch(monkeypatch):
    """Under autocast the LayerNorm runs in fp32 and only the matmul operands (weight, bias)
    take the autocast dtype, as autocast does to F.layer_norm + F.linear; layer_norm alone is
    fp32. What the kernels receive is recorded at their entry points."""
    from tsfast.kernels import layernorm_gelu as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = {}

    def linear_forward(x2, ln_weight, ln_bias, weight, bias, *, activation, eps):
        seen["layernorm_linear"] = [t.dtype for t in (x2, ln_weight, ln_bias, weight)]
        y = reference64.layernorm_linear(x2, ln_weight, ln_bias, weight.float()).to(weight.dtype)
        stats = torch.zeros(x2.shape[0])
        return y, stats, stats.clone(), None

    def norm_forward(x2, weight, bias, eps):
        seen["layer_norm"] = [t.dtype for t in (x2, weight, bias)]
        return reference64.layer_norm(x2, weight, bias), torch.zeros(x2.shape[0]), torch.zeros(x2.shape[0])

    monkeypatch.setattr(kernels, "layernorm_linear_forward", linear_forward)
    monkeypatch.setattr(kernels, "layer_norm_forward", norm_forward)
    x, lw, lb, w = torch.randn(4, 8), torch.randn(8), torch.randn(8), torch.randn(6, 8)
    with ops.use("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.layernorm_linear(x, lw, lb, w, None)
        z = ops.layer_norm(x, lw, lb)
        with ops.use("torch"):
            y_torch, z_torch = ops.layernorm_linear(x, lw, lb, w, None), ops.layer_norm(x, lw, lb)
    assert seen["layernorm_linear"] == [torch.float32] * 3 + [torch.bfloat16]
    assert seen["layer_norm"] == [torch.float32] * 3
    assert (y.dtype, z.dtype) == (y_torch.dtype, z_torch.dtype) == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_fused_loss_does_no_gradient_work_without_grad(monkeypatch, reduction):
    """Under no_grad (and inference_mode) the fused loss's chunk loop computes no dh and no
    dW: no logit gradient is written and no dW GEMM runs. Counted at the chunk loop and the
    row kernel's launcher, under the interpreter."""
    from tsfast.kernels import cross_entropy as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    passes, grad_writes = [], []
    real_pass, real_launch = kernels._chunked_pass, kernels._launch_forward
    monkeypatch.setattr(kernels, "_chunked_pass",
                        lambda *a, **kw: passes.append((kw["want_dh"], kw["want_dw"])) or real_pass(*a, **kw))
    monkeypatch.setattr(kernels, "_launch_forward",
                        lambda *a, **kw: grad_writes.append(len(a) > 6 and a[6] is not None) or real_launch(*a, **kw))
    h = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 37, (9,))
    with ops.use("triton"):
        with torch.no_grad():
            ops.linear_cross_entropy(h, w, t, reduction=reduction)
        with torch.inference_mode():
            ops.linear_cross_entropy(h, w, t, reduction=reduction)
        assert passes == [(False, False)] * 2 and not any(grad_writes)
        loss = ops.linear_cross_entropy(h, w, t, reduction=reduction)
        loss.sum().backward()
    wanted = (True, True) if reduction == "mean" else (False, False)
    assert passes[2] == wanted and h.grad is not None and w.grad is not None
