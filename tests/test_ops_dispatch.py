"""Backend selection in tsfast.ops: use(), TSFAST_KERNELS, auto, explicit triton, fallbacks."""

import logging
import subprocess
import sys
import types

import pytest
import torch

from tsfast import ops, reference


@pytest.fixture(autouse=True)
def _fresh_dispatch_state(monkeypatch):
    monkeypatch.setattr(ops, "_selected", None)
    monkeypatch.setattr(ops, "_logged_fallbacks", set())
    monkeypatch.delenv("TSFAST_KERNELS", raising=False)


def _attention_inputs(D=64, T=9, dtype=torch.float32, device="cpu"):
    q, k, v = (torch.randn(2, 3, T, D, dtype=dtype, device=device) for _ in range(3))
    cos, sin = reference.rope_cos_sin(T, D, device=device)
    return q, k, v, cos, sin


def _fake_attention_kernel(supports_dropout=False):
    """A stand-in kernel module that records its calls and answers with the reference."""
    calls = []

    def rope_attention(q, k, v, cos, sin, **kw):
        calls.append(q.shape)
        return reference.rope_attention(q, k, v, cos, sin, **kw)

    mod = types.SimpleNamespace(rope_attention=rope_attention, SUPPORTS_DROPOUT=supports_dropout)
    return mod, calls


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


def test_auto_on_cpu_runs_the_reference():
    q, k, v, cos, sin = _attention_inputs()
    assert ops.backend_for("rope_attention", q.device) == "torch"
    out = ops.rope_attention(q, k, v, cos, sin)
    torch.testing.assert_close(out, reference.rope_attention(q, k, v, cos, sin), rtol=0, atol=0)


def test_explicit_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops.use("triton")
    x = torch.randn(4, 8)
    with pytest.raises(ops.BackendUnavailable, match="CUDA GPU.*--kernels auto or torch.*TRITON_INTERPRET=1"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8))


def test_explicit_triton_on_meta_device_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match="on meta"):
        ops.backend_for("layer_norm", torch.device("meta"))


def test_explicit_triton_routes_to_the_kernel_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake, calls = _fake_attention_kernel()
    monkeypatch.setitem(ops._modules, "rope_attention", (fake, None))
    q, k, v, cos, sin = _attention_inputs()
    with ops.use("triton"):
        out = ops.rope_attention(q, k, v, cos, sin)
    assert calls == [q.shape]
    torch.testing.assert_close(out, reference.rope_attention(q, k, v, cos, sin))


@pytest.mark.parametrize(
    "case, match",
    [
        (dict(D=48), "head dim 48 is not one of"),
        (dict(dropout_p=0.1), "dropout is not implemented"),
        (dict(dtype=torch.float64), "float64 runs on torch only"),
    ],
)
def test_unsupported_call_raises_under_triton_and_falls_back_under_auto(monkeypatch, caplog, case, match):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake, calls = _fake_attention_kernel()
    monkeypatch.setitem(ops._modules, "rope_attention", (fake, None))
    dropout_p = case.pop("dropout_p", 0.0)
    q, k, v, cos, sin = _attention_inputs(**case)
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match=match + ".*--kernels auto"):
        ops.rope_attention(q, k, v, cos, sin, dropout_p=dropout_p)
    assert calls == []

    # auto sends the call to torch, logging once per (op, reason); CUDA is faked because
    # auto never considers Triton for CPU tensors.
    monkeypatch.setattr(ops, "_triton_missing", lambda: None)
    cuda = torch.device("cuda")
    unsupported = match  # any reason string stands for the call's
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        for _ in range(3):
            assert ops.backend_for("rope_attention", cuda, unsupported) == "torch"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"tsfast: rope_attention runs on torch: {unsupported}"]
    assert ops.backend_for("rope_attention", cuda) == "triton"


def test_auto_on_cpu_takes_unsupported_calls_silently(caplog):
    q, k, v, cos, sin = _attention_inputs(D=48)
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        out = ops.rope_attention(q, k, v, cos, sin)
    assert caplog.records == []
    assert out.shape == q.shape


def test_missing_kernel_module(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(ops._TRITON_IMPL, "layer_norm", ("tsfast.kernels.no_such_module", "layer_norm"))
    monkeypatch.delitem(ops._modules, "layer_norm", raising=False)
    x = torch.randn(5, 8)
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match="no Triton kernel for layer_norm"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8))
    monkeypatch.setattr(ops, "_triton_missing", lambda: None)
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        assert ops.backend_for("layer_norm", torch.device("cuda")) == "torch"
    assert "no Triton kernel for layer_norm" in caplog.text


def test_broken_kernel_module_is_reported_not_hidden(monkeypatch, tmp_path, caplog):
    (tmp_path / "tsfast_broken_kernel.py").write_text("raise RuntimeError('kernel typo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(ops._TRITON_IMPL, "layer_norm", ("tsfast_broken_kernel", "layer_norm"))
    monkeypatch.delitem(ops._modules, "layer_norm", raising=False)
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match="fails to import.*kernel typo"):
        ops.backend_for("layer_norm", torch.device("cpu"))
    monkeypatch.setattr(ops, "_triton_missing", lambda: None)
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        assert ops.backend_for("layer_norm", torch.device("cuda")) == "torch"
    assert "kernel typo" in caplog.text


def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(ops, "_triton_missing", lambda: "Triton does not import (ImportError: nope)")
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable, match="Triton does not import.*--kernels torch"):
        ops.backend_for("layer_norm", torch.device("cpu"))
    with ops.use("auto"):
        assert ops.backend_for("layer_norm", torch.device("cuda")) == "torch"


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_every_op_matches_the_reference_on_cpu(backend):
    N, C, F, V = 7, 16, 24, 33
    x, lw, lb = torch.randn(N, C), torch.randn(C), torch.randn(C)
    w, b = torch.randn(F, C), torch.randn(F)
    t = torch.randint(0, V, (N,))
    t[2] = -100
    with ops.use(backend):
        got = [
            ops.layer_norm(x, lw, lb),
            ops.layernorm_linear(x, lw, lb, w, b, activation="gelu_tanh"),
            ops.cross_entropy(torch.randn(N, V).mul_(3), t),
        ]
        h, wv = torch.randn(N, C), torch.randn(V, C)
        got.append(ops.linear_cross_entropy(h, wv, t, reduction="sum"))
    torch.testing.assert_close(got[0], reference.layer_norm(x, lw, lb))
    torch.testing.assert_close(got[1], reference.layernorm_linear(x, lw, lb, w, b, activation="gelu_tanh"))
    torch.testing.assert_close(got[3], reference.linear_cross_entropy_full(h, wv, t, reduction="sum"))
    assert got[2].shape == () and torch.isfinite(got[2])


def test_importing_tsfast_does_not_import_triton():
    code = ("import sys, tsfast, tsfast.ops, tsfast.meter, tsfast.flops, tsfast.reference; "
            "bad = [m for m in sys.modules if m == 'triton' or m.startswith('torch._dynamo')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_path_never_loads_a_kernel_module(monkeypatch, backend):
    def no_kernels(op):
        raise AssertionError(f"kernel module for {op} loaded on the torch path")

    monkeypatch.setattr(ops, "_load_kernel", no_kernels)
    q, k, v, cos, sin = _attention_inputs()
    with ops.use(backend):
        out = ops.rope_attention(q, k, v, cos, sin, dropout_p=0.1)
        ops.layer_norm(torch.randn(3, 8), torch.ones(8), None)
    assert out.shape == q.shape


def test_triton_path_applies_autocast_like_torch(monkeypatch):
    """Under autocast the kernels get the matmul operands in the autocast dtype (as F.linear
    would) with autocast off inside; layer_norm, which autocast keeps in fp32, gets fp32."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = {}

    def fake(op):
        def kernel(*args, **kwargs):
            seen[op] = ([a.dtype for a in args if isinstance(a, torch.Tensor)], torch.is_autocast_enabled("cpu"))
            return getattr(reference, op)(*args, **kwargs)
        return kernel

    for op in ("layernorm_linear", "layer_norm"):
        monkeypatch.setitem(ops._modules, op, (types.SimpleNamespace(**{op: fake(op)}), None))
    x, lw, lb, w = torch.randn(4, 8), torch.randn(8), torch.randn(8), torch.randn(6, 8)
    with ops.use("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.layernorm_linear(x, lw, lb, w, None)
        z = ops.layer_norm(x, lw, lb)
    assert seen["layernorm_linear"] == ([torch.bfloat16] * 4, False)
    assert seen["layer_norm"] == ([torch.float32] * 3, True)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32
    with ops.use("triton"):
        ops.layernorm_linear(x, lw, lb, w, None)
    assert seen["layernorm_linear"] == ([torch.float32] * 4, False)
