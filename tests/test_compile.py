"""torch.compile over tsfast.ops: no graph break anywhere on the torch path.

On CPU the graph is captured with fullgraph=True and the "aot_eager" backend: Dynamo
(where graph breaks come from) and AOTAutograd (which traces the backward, custom
autograd.Functions included) run as under inductor, without inductor's C++ codegen, which
would add a minute on this machine and tests torch rather than tsfast. Triton kernels under
compile need a GPU (the interpreter cannot be traced; DESIGN.md).
"""

import pytest
import torch

from tsfast import meter, ops, reference

B, T, C, NH, V = 2, 12, 32, 2, 40
HD = C // NH


def _block_and_loss(x, p, cos, sin, targets):
    """One GPT block and both losses, written only with tsfast.ops calls."""
    qkv = ops.layernorm_linear(x, p["ln1_w"], p["ln1_b"], p["attn_w"], p["attn_b"])
    q, k, v = qkv.view(B, T, 3, NH, HD).permute(2, 0, 3, 1, 4)
    att = ops.rope_attention(q, k, v, cos, sin, causal=True)
    x = x + att.transpose(1, 2).reshape(B, T, C) @ p["proj_w"].t()
    hidden = ops.layernorm_linear(x, p["ln2_w"], p["ln2_b"], p["fc_w"], None, activation="gelu_tanh")
    x = x + hidden @ p["fc2_w"].t()
    h = ops.layer_norm(x, p["lnf_w"], p["lnf_b"]).view(B * T, C)
    fused = ops.linear_cross_entropy(h, p["wte"], targets)
    per_row = ops.linear_cross_entropy(h, p["wte"], targets, reduction="none")
    plain = ops.cross_entropy(h @ p["wte"].t(), targets, reduction="sum")
    return fused + per_row.mean() + plain / (B * T)


def _params():
    shapes = dict(ln1_w=(C,), ln1_b=(C,), attn_w=(3 * C, C), attn_b=(3 * C,), proj_w=(C, C),
                  ln2_w=(C,), ln2_b=(C,), fc_w=(4 * C, C), fc2_w=(C, 4 * C), lnf_w=(C,),
                  lnf_b=(C,), wte=(V, C))
    return {n: (torch.randn(s) * (1.0 if len(s) == 1 else s[1] ** -0.5)).requires_grad_() for n, s in shapes.items()}


def _loss_and_grads(fn, x, params, cos, sin, targets):
    loss = fn(x, params, cos, sin, targets)
    grads = torch.autograd.grad(loss, [x, *params.values()])
    return loss.detach(), grads


def test_torch_path_compiles_without_graph_breaks_and_matches_eager(monkeypatch):
    monkeypatch.setattr(ops, "_selected", None)
    x = torch.randn(B, T, C, requires_grad=True)
    params = _params()
    cos, sin = reference.rope_cos_sin(T, HD)
    targets = torch.randint(0, V, (B * T,))
    targets[3] = -100
    torch._dynamo.reset()
    compiled = torch.compile(_block_and_loss, fullgraph=True, backend="aot_eager")

    m = meter.enable()  # metering must not split the graph either: it is skipped inside it
    try:
        loss_c, grads_c = _loss_and_grads(compiled, x, params, cos, sin, targets)
        assert m.lines(1.0) == []
    finally:
        meter.disable()
    loss_e, grads_e = _loss_and_grads(_block_and_loss, x, params, cos, sin, targets)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)


def test_backend_choice_is_a_constant_for_dynamo():
    # What torch.compiler.assume_constant_result marks; ops sets it without importing dynamo.
    probe = torch.compiler.assume_constant_result(lambda: None)
    marks = [a for a in vars(probe) if a.startswith("_dynamo")]
    assert marks and all(getattr(ops.backend_for, a) for a in marks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton under torch.compile needs a CUDA GPU")
def test_triton_path_compiles_on_gpu(monkeypatch):
    monkeypatch.setattr(ops, "_selected", None)
    missing = [op for op in ops._TRITON_IMPL if ops._kernel_missing(op)]
    if missing:
        pytest.skip(f"kernels not written yet: {', '.join(missing)}")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(B, T, C, device=dev, requires_grad=True)
    params = {n: p.detach().to(dev).requires_grad_() for n, p in _params().items()}
    cos, sin = reference.rope_cos_sin(T, HD, device=dev)
    targets = torch.randint(0, V, (B * T,), device=dev)
    torch._dynamo.reset()
    with ops.use("triton"):
        compiled = torch.compile(_block_and_loss, fullgraph=True)
        loss_c, grads_c = _loss_and_grads(compiled, x, params, cos, sin, targets)
    with ops.use("torch"):
        loss_e, grads_e = _loss_and_grads(_block_and_loss, x, params, cos, sin, targets)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-3, atol=1e-3)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-2, atol=1e-3)
