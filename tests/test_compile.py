"""torch.compile over a whole GPT step: zero graph breaks on both backends.

The Triton path is a set of opaque torch.library custom ops (docs/design.md, "Compile"):
Dynamo traces their fake versions and AOTAutograd their registered backward, and the kernels
run at run time, on CPU in Triton's interpreter. So the same test runs here and on a GPU.
On CPU the "aot_eager" backend is used: Dynamo (where graph breaks come from) and AOTAutograd
(which traces the backward) run as under inductor, without inductor's C++ codegen, which
would add a minute on this machine and tests torch rather than tsfast.
"""

import pytest
import torch

from tsfast import meter, ops
from tsfast.config import GPTConfig
from tsfast.model import GPT
from tsfast.testing import interpreter_ready

B, T, V = 2, 19, 97  # T not a multiple of any block
TINY = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=32, vocab_size=V)  # the tiny preset's shape


def _backends():
    yield "torch"
    why = interpreter_ready()
    yield pytest.param("triton", marks=pytest.mark.skipif(why is not None, reason=str(why)))


def _model_and_batch(device, doc_mask=False):
    torch.manual_seed(0)
    model = GPT(TINY).to(device)
    idx = torch.randint(0, V, (B, T), device=device)
    targets = idx.roll(-1, dims=1)
    targets[0, 3] = -100
    doc_ids = (torch.rand(B, T, device=device) < 0.2).long().cumsum(1) if doc_mask else None
    return model, idx, targets, doc_ids


def _loss_and_grads(fn, model, idx, targets, doc_ids):
    model.zero_grad(set_to_none=True)
    loss = fn(idx, targets, doc_ids)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("doc_mask", [False, True], ids=["plain", "doc_ids"])
def test_gpt_step_has_no_graph_break_and_matches_eager(backend, doc_mask, monkeypatch):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, idx, targets, doc_ids = _model_and_batch(device, doc_mask)

    def step(idx, targets, doc_ids):
        return model(idx, targets, doc_ids=doc_ids)[1]

    with ops.use(backend):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(step)(idx, targets, doc_ids)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
        m = meter.enable()  # metering must not split the graph: it is skipped inside compiled code
        try:
            loss_c, grads_c = _loss_and_grads(compiled, model, idx, targets, doc_ids)
            assert m.lines(1.0) == []
        finally:
            meter.disable()
        loss_e, grads_e = _loss_and_grads(step, model, idx, targets, doc_ids)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)


def test_backend_choice_is_a_constant_for_dynamo():
    # What torch.compiler.assume_constant_result marks; ops sets it without importing dynamo.
    from tsfast.ops import _backend

    probe = torch.compiler.assume_constant_result(lambda: None)
    marks = [a for a in vars(probe) if a.startswith("_dynamo")]
    assert marks and all(getattr(_backend.use_triton, a) for a in marks)
