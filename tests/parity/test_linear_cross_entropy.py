"""Parity of the Triton fused linear cross-entropy with torch (full logits) and float64.

Covers V in {97, 1000, 50257, 50304}, C in {64, 768}, N in {1, 5, 257} (N = 2048 rows is in
test_cross_entropy.py: the row kernel is the same, and the interpreter is slow per row), each
reduction, ignored targets, and several chunks with a short last one.
"""

import pytest
import reference64
import torch

from tsfast import ops
from tsfast.kernels import cross_entropy as kernel
from tsfast.testing import assert_parity, device_for_tests, interpreter_ready, kernel_dtypes

pytestmark = pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready()))

# Slack on top of the 2x rule (losses are O(10) per row; dh, dW are sums over V and N).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
IGNORE = -100

# (N, C, V, reduction, share of targets ignored)
CASES = [
    (1, 64, 97, "sum", 0.0),
    (5, 64, 50257, "mean", 0.4),
    (257, 768, 1000, "none", 0.25),
    (3, 64, 50304, "none", 0.0),
]


def _inputs(n, c, vocab, ignored_share, seed, *, h_std=1.0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=gen, dtype=torch.float64) * h_std
    w = torch.randn(vocab, c, generator=gen, dtype=torch.float64) * (2.0 / c**0.5)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored_share] = IGNORE
    dev = device_for_tests()
    return h.to(dev), w.to(dev), targets.to(dev), gen


def _triton_lce(*args, **kw):
    with ops.use("triton"):
        return ops.linear_cross_entropy(*args, **kw)


def _full_logits(h, w, targets, **kw):
    """torch in the inputs' dtype: the full logits, then the torch path's cross-entropy."""
    with ops.use("torch"):
        return ops.cross_entropy(h @ w.t(), targets, **kw)


def _run(fn, h, w, targets, reduction, upstream, *, grad_h=True, grad_w=True):
    h = h.detach().clone().requires_grad_(grad_h)
    w = w.detach().clone().requires_grad_(grad_w)
    loss = fn(h, w, targets, ignore_index=IGNORE, reduction=reduction)
    if upstream is None:
        loss.sum().backward()
    else:
        (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def _check(h64, w64, targets, dtype, reduction, upstream64):
    h, w = h64.to(dtype), w64.to(dtype)
    up = None if upstream64 is None else upstream64.float()
    out = _run(_triton_lce, h, w, targets, reduction, up)
    same = _run(_full_logits, h, w, targets, reduction, up)
    ref = _run(reference64.linear_cross_entropy, h.double(), w.double(), targets, reduction, upstream64)
    for name, o, s, r in zip(("loss", "dh", "dW"), out, same, ref, strict=True):
        assert o.dtype == s.dtype, f"{name}: dtype {o.dtype} != torch's {s.dtype}"
        assert_parity(f"{name} ({reduction}, {dtype})", o, s, r, atol=ATOL[dtype])
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("n,c,vocab,reduction,ignored", CASES)
def test_parity_random_upstream(n, c, vocab, reduction, ignored, dtype):
    h, w, targets, gen = _inputs(n, c, vocab, ignored, seed=n + c + vocab)
    upstream = torch.randn((n,) if reduction == "none" else (), generator=gen, dtype=torch.float64)
    _check(h, w, targets, dtype, reduction, upstream.to(h.device))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_many_chunks_short_last_chunk_and_stride0_grads(reduction, monkeypatch):
    """Force 32-row chunks (150 rows: 4 full chunks and one of 22); backward via out.sum()."""
    monkeypatch.setattr(kernel, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 32 * 1000 * 4)
    assert kernel.chunk_rows(150, 1000, 4) == 32
    h, w, targets, _ = _inputs(150, 64, 1000, 0.3, seed=17)
    _check(h, w, targets, torch.float32, reduction, None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_and_finite(reduction):
    h, w, _, _ = _inputs(7, 64, 97, 0.0, seed=2)
    targets = torch.full((7,), IGNORE, device=h.device)
    loss, dh, dw = _run(_triton_lce, h.float(), w.float(), targets, reduction, None)
    for name, t in (("loss", loss), ("dh", dh), ("dW", dw)):
        assert torch.equal(t, torch.zeros_like(t)), f"{name} must be exactly 0 when all are ignored"


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_large_logits_stay_finite(dtype):
    """h ~ 100 and W ~ 12 give logits of magnitude ~1e4 (still inside fp16's range)."""
    h, w, targets, gen = _inputs(6, 64, 1000, 0.2, seed=4, h_std=100.0)
    w = w * (12.5 * 64**0.5 / 2.0)
    upstream = torch.randn((), generator=gen, dtype=torch.float64).to(h.device)
    loss, dh, dw = _check(h, w, targets, dtype, "mean", upstream)
    assert torch.isfinite(loss).all() and torch.isfinite(dh).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_for_one_input_only(reduction):
    """Only W (frozen activations) or only h (frozen embedding) asks for a gradient."""
    h, w, targets, _ = _inputs(20, 64, 97, 0.2, seed=9)
    for grad_h, grad_w in ((False, True), (True, False)):
        got = _run(_triton_lce, h.float(), w.float(), targets, reduction, None, grad_h=grad_h, grad_w=grad_w)
        ref = _run(reference64.linear_cross_entropy, h, w, targets, reduction, None, grad_h=grad_h, grad_w=grad_w)
        for g, r in zip(got[1:], ref[1:], strict=True):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-4)


def test_no_grad_forward_and_determinism():
    h, w, targets, _ = _inputs(33, 64, 1000, 0.2, seed=12)
    with torch.no_grad():
        plain = _triton_lce(h.float(), w.float(), targets, ignore_index=IGNORE, reduction="mean")
    first = _run(_triton_lce, h.float(), w.float(), targets, "mean", None)
    second = _run(_triton_lce, h.float(), w.float(), targets, "mean", None)
    assert torch.equal(plain, first[0])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "two identical runs must be bit-identical"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bf16_gpt2_shape_several_chunks(reduction):
    """bf16 at the gpt2 width and vocabulary with N large enough for several chunks."""
    h, w, targets, gen = _inputs(12288, 768, 50304, 0.1, seed=1)
    assert kernel.chunk_rows(12288, 50304, 2) < 12288
    upstream = torch.randn((12288,) if reduction == "none" else (), generator=gen, dtype=torch.float64)
    _check(h, w, targets, torch.bfloat16, reduction, upstream.to(h.device))
