"""Parity of the Triton cross-entropy (tsfast/kernels/cross_entropy.py) with torch and float64.

On CPU the kernels run under TRITON_INTERPRET=1, so the shapes cover each required size once
(V in {97, 1000, 50257, 50304}, N in {1, 5, 257, 2048}) rather than their cross product.
"""

import pytest
import reference64
import torch

from tsfast import ops
from tsfast.testing import ATOL, assert_parity, device_for_tests, interpreter_ready, kernel_dtypes

pytestmark = pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready()))

# Slack on top of the 2x rule (testing.ATOL): the losses are sums of O(10) terms, the gradients
# lie in [-1, 1].
IGNORE = -100

# (N, V, reduction, share of targets ignored)
CASES = [
    (1, 97, "mean", 0.0),
    (5, 50257, "sum", 0.4),
    (257, 1000, "none", 0.25),
    (3, 50304, "none", 0.0),
]
# The interpreter runs programs one by one (~10 ms each): N=2048 rows costs ~40 s per dtype
# there, so on CPU it runs in fp32 only.
MANY_ROWS = (2048, 97, "mean", 0.5)


def _inputs(n, vocab, ignored_share, seed, *, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored_share] = IGNORE
    dev = device_for_tests()
    return logits.to(dev), targets.to(dev), gen


def _loss_and_grad(fn, logits, targets, reduction, upstream):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, ignore_index=IGNORE, reduction=reduction)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad


def _triton_ce(*args, **kw):
    with ops.use("triton"):
        return ops.cross_entropy(*args, **kw)


def _torch_ce(*args, **kw):
    with ops.use("torch"):
        return ops.cross_entropy(*args, **kw)


def _check(logits64, targets, dtype, reduction, upstream64):
    x = logits64.to(dtype)
    up = upstream64.to(torch.float32)
    out = _loss_and_grad(_triton_ce, x, targets, reduction, up)
    same = _loss_and_grad(_torch_ce, x, targets, reduction, up)
    ref = _loss_and_grad(reference64.cross_entropy, x.double(), targets, reduction, upstream64)
    for name, o, s, r in zip(("loss", "dlogits"), out, same, ref, strict=True):
        assert o.dtype == s.dtype, f"{name}: dtype {o.dtype} != torch's {s.dtype}"
        assert_parity(f"{name} ({reduction}, {dtype})", o, s, r, atol=ATOL[dtype])
    return out


@pytest.mark.parametrize(
    "n,vocab,reduction,ignored,dtype",
    [(*case, dtype) for case in CASES for dtype in kernel_dtypes()]
    + [(*MANY_ROWS, dtype) for dtype in kernel_dtypes() if dtype != torch.float16 or torch.cuda.is_available()],
)
def test_parity_random_upstream(n, vocab, reduction, ignored, dtype):
    logits, targets, gen = _inputs(n, vocab, ignored, seed=n * 7 + vocab)
    shape = (n,) if reduction == "none" else ()
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64).to(logits.device)
    _check(logits, targets, dtype, reduction, upstream)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_of_sum_uses_stride0_grads(reduction):
    """loss.sum().backward() hands the op an expanded, stride-0 gradient."""
    logits, targets, _ = _inputs(33, 1000, 0.3, seed=11)
    x = logits.float().requires_grad_()
    with ops.use("triton"):
        ops.cross_entropy(x, targets, ignore_index=IGNORE, reduction=reduction).sum().backward()
    y = logits.requires_grad_()
    reference64.cross_entropy(y, targets, ignore_index=IGNORE, reduction=reduction).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_and_finite(reduction):
    logits, _, _ = _inputs(6, 1000, 0.0, seed=5)
    targets = torch.full((6,), IGNORE, device=logits.device)
    loss, grad = _loss_and_grad(_triton_ce, logits.float(), targets, reduction, 1.0)
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    assert torch.equal(grad, torch.zeros_like(grad)), "ignored rows must get exactly 0 gradient"


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_large_logits_stay_finite(dtype):
    """Logits of magnitude 1e4: the online max keeps exp2 in range; loss and grad finite."""
    logits, targets, gen = _inputs(9, 1000, 0.2, seed=3, scale=1.0)
    logits = logits.sign() * 1e4 - logits  # values near +-1e4, distinct
    upstream = torch.randn((), generator=gen, dtype=torch.float64).to(logits.device)
    loss, grad = _check(logits, targets, dtype, "mean", upstream)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_custom_ignore_index_int32_targets_and_strided_logits():
    """ignore_index other than -100, int32 targets, and logits with a row stride > V."""
    wide, targets, gen = _inputs(17, 1100, 0.0, seed=8)
    logits = wide[:, :1000]  # row stride 1100, a view into a wider buffer
    targets = targets.clamp_max(999).to(torch.int32)
    targets[::3] = 7
    upstream = torch.randn(17, generator=gen, dtype=torch.float64).to(wide.device)

    def run(fn, x):
        loss = fn(x, targets, ignore_index=7, reduction="none")
        (loss * upstream.to(loss.dtype)).sum().backward()
        return loss.detach()

    x32 = wide.float()[:, :1000].requires_grad_()
    loss = run(_triton_ce, x32)
    x64 = logits.detach().clone().requires_grad_()
    ref = run(reference64.cross_entropy, x64)
    assert torch.equal(loss[::3], torch.zeros_like(loss[::3]))
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_caller_logits_are_not_overwritten_and_runs_are_deterministic():
    logits, targets, _ = _inputs(40, 1000, 0.2, seed=21)
    x = logits.float()
    before = x.clone()
    first = _loss_and_grad(_triton_ce, x, targets, "mean", 1.0)
    second = _loss_and_grad(_triton_ce, x, targets, "mean", 1.0)
    assert torch.equal(x, before), "the standalone op must not write into the caller's logits"
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_under_torch_compile_with_ignored_targets():
    """Compiled (dynamo graph-breaks around the kernels) == eager, ignored targets included."""
    logits, targets, _ = _inputs(24, 97, 0.5, seed=13)
    x = logits.float()

    def step(x, t):
        return ops.cross_entropy(x * 2.0, t, ignore_index=IGNORE, reduction="mean")

    with ops.use("triton"):
        eager = _loss_and_grad(lambda a, t, **kw: step(a, t), x, targets, "mean", 1.0)
        compiled_step = torch.compile(step, backend="aot_eager", fullgraph=False)
        compiled = _loss_and_grad(lambda a, t, **kw: compiled_step(a, t), x, targets, "mean", 1.0)
    torch.testing.assert_close(compiled[0], eager[0], atol=0, rtol=0)
    torch.testing.assert_close(compiled[1], eager[1], atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bf16_gpt2_rows_and_inductor(reduction):
    """bf16 at the gpt2 vocabulary with many rows, and torch.compile (inductor) over Triton."""
    logits, targets, gen = _inputs(4096, 50304, 0.1, seed=1)
    shape = (4096,) if reduction == "none" else ()
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64).to(logits.device)
    _check(logits, targets, torch.bfloat16, reduction, upstream)
    x = logits.to(torch.bfloat16)
    with ops.use("triton"):
        compiled = torch.compile(lambda a, t: ops.cross_entropy(a, t, reduction=reduction))
        eager = _loss_and_grad(_triton_ce, x, targets, reduction, upstream.float())
        got = _loss_and_grad(lambda a, t, **kw: compiled(a, t), x, targets, reduction, upstream.float())
    torch.testing.assert_close(got[0], eager[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], eager[1], atol=0, rtol=0)
