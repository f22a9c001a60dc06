"""The torch paths of tsfast.ops (the CPU/MPS backend) against plain formulations.

- The chunked linear cross-entropy (tsfast/ops/_chunked_loss.py: in-place softmax in a reused
  logits buffer, row weights on the thin sides) against the float64 full-logits oracle, for
  every reduction, ignored rows, several equal chunks, stride-0 upstream gradients, float64
  and fp16 inputs and logits of magnitude 1e4; no gradient work under no_grad; a second
  backward is refused; and its peak memory stays within one chunk buffer plus the dW-sized
  accumulator, far below the full logits.
- The CPU rope + flash attention Function against apply_rope + SDPA and the float64 math
  path, on views of a fused projection as the model makes them, and the one-query decoding
  step (no mask built) against the float64 oracle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import reference64
import torch
import torch.nn.functional as F

from tsfast import ops
from tsfast.ops import _chunked_loss as chunked
from tsfast.ops.rotary import apply_rope

IGNORE = -100


def _inputs(n, c, vocab, *, seed, ignored=0.25, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    w = torch.randn(vocab, c, generator=g, dtype=torch.float64) * (2.0 / c**0.5) * scale
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = IGNORE
    return h, w, t, g


def _loss_and_grads(fn, h, w, t, reduction, upstream):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, t, ignore_index=IGNORE, reduction=reduction)
    if upstream is None:
        loss.sum().backward()  # a stride-0 upstream gradient
    else:
        (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.fixture
def small_chunks(monkeypatch):
    """32-row chunks: 150 rows make 5 equal chunks of 30."""
    monkeypatch.setattr(chunked, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 32 * 1000 * 4)
    assert chunked._chunk_rows(150, 1000) == 30


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("random_upstream", [False, True])
def test_chunked_matches_float64_oracle(small_chunks, reduction, random_upstream):
    h64, w64, t, g = _inputs(150, 64, 1000, seed=3)
    upstream = torch.randn((150,) if reduction == "none" else (), generator=g, dtype=torch.float64)
    up = upstream if random_upstream else None
    got = _loss_and_grads(chunked.linear_cross_entropy_chunked, h64.float(), w64.float(), t, reduction, up)
    ref = _loss_and_grads(reference64.linear_cross_entropy, h64, w64, t, reduction, up)
    for name, a, b in zip(("loss", "dh", "dW"), got, ref, strict=True):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-6, msg=name)
    if reduction == "none":
        assert torch.all(got[0][t == IGNORE] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_stays_float64(reduction):
    h64, w64, t, _ = _inputs(40, 32, 97, seed=5)
    got = _loss_and_grads(chunked.linear_cross_entropy_chunked, h64, w64, t, reduction, None)
    ref = _loss_and_grads(reference64.linear_cross_entropy, h64, w64, t, reduction, None)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fp16_inputs_compute_in_fp32_and_return_their_dtype():
    h64, w64, t, _ = _inputs(33, 64, 1000, seed=6)
    loss, dh, dw = _loss_and_grads(chunked.linear_cross_entropy_chunked, h64.half(), w64.half(), t, "mean", None)
    assert (loss.dtype, dh.dtype, dw.dtype) == (torch.float32, torch.float16, torch.float16)
    ref = _loss_and_grads(reference64.linear_cross_entropy, h64.half().double(), w64.half().double(), t, "mean", None)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), ref[1], rtol=1e-2, atol=1e-4)


def test_huge_logits_give_exact_finite_losses():
    """Logits ~1e4: most target probabilities underflow to 0 in fp32, yet loss = lse - z_t
    is recovered from the largest probability, which never underflows."""
    h64, w64, t, _ = _inputs(12, 64, 500, seed=7, ignored=0.0, scale=40.0)
    loss, dh, dw = _loss_and_grads(chunked.linear_cross_entropy_chunked, h64.float(), w64.float(), t, "none", None)
    ref = _loss_and_grads(reference64.linear_cross_entropy, h64.float().double(), w64.float().double(), t, "none", None)
    assert ref[0].max() > 1000  # the check is meaningful: p_t = exp(-loss) is 0 in fp32
    assert torch.isfinite(loss).all() and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=0.05)


def test_no_grad_computes_only_the_loss(monkeypatch):
    calls = []
    real = chunked._lce_chunks

    def spy(*args):
        calls.append(args[-2:])  # (want_dh, want_dW)
        return real(*args)

    monkeypatch.setattr(chunked, "_lce_chunks", spy)
    h64, w64, t, _ = _inputs(20, 32, 97, seed=8)
    h, w = h64.float().requires_grad_(), w64.float().requires_grad_()
    with torch.no_grad():
        plain = chunked.linear_cross_entropy_chunked(h, w, t)
    with_grad = chunked.linear_cross_entropy_chunked(h, w, t)
    assert calls == [(False, False), (True, True)]
    assert torch.equal(plain, with_grad.detach())
    chunked.linear_cross_entropy_chunked(h.detach(), w, t)
    assert calls[-1] == (False, True)


def test_second_backward_is_refused_with_a_clear_error():
    h64, w64, t, _ = _inputs(8, 16, 50, seed=9)
    h = h64.float().requires_grad_()
    loss = chunked.linear_cross_entropy_chunked(h, w64.float(), t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


CHILD = r"""
import json, resource, sys, torch
from tsfast.ops import _chunked_loss as chunked
n, c, v = 2048, 256, 50304
g = torch.Generator().manual_seed(0)
h = torch.randn(n, c, generator=g).requires_grad_()
w = (torch.randn(v, c, generator=g) * 0.02).requires_grad_()
t = torch.randint(0, v, (n,), generator=g)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
chunked.linear_cross_entropy_chunked(h, w, t).backward()
print(json.dumps({"peak_mib": status("VmHWM") - base, "chunk_mib": chunked.CHUNK_BYTES / 2**20}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_one_chunk_and_the_weight_gradient_not_the_logits():
    """N=2048, C=256, V=50304: full fp32 logits are 393 MiB (plus as much again for their
    gradient); the chunked path may hold one chunk buffer, the (V, C) fp32 dW (49 MiB), and
    the weight's .grad while dW is handed over."""
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TSFAST_KERNELS="torch"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    weight_mib = 50304 * 256 * 4 / 2**20
    limit = got["chunk_mib"] + 2 * weight_mib + 24
    full_logits_mib = 2048 * 50304 * 4 / 2**20
    assert got["peak_mib"] <= limit < full_logits_mib, got


# ----------------------------------------------------------------------------- attention


def _qkv(B, T, H, D, *, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3 * H * D, generator=g, dtype=torch.float64).to(dtype)


def _attend(fn, qkv, B, T, H, D, cos, sin, upstream):
    qkv = qkv.detach().clone().requires_grad_()
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    y = fn(q, k, v, cos, sin).transpose(1, 2).reshape(B, T, H * D)
    (y.sum() if upstream is None else (y * upstream).sum()).backward()
    return y.detach(), qkv.grad


def _torch_op(q, k, v, cos, sin):
    with ops.use("torch"):
        return ops.rope_attention(q, k, v, cos, sin)


def _generic(q, k, v, cos, sin):
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if q.dtype == torch.float64:
        return reference64.rope_attention(q, k, v, causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("random_upstream", [False, True])
def test_cpu_flash_function_matches_sdpa_and_float64(T, rope, random_upstream):
    B, H, D = 2, 3, 32
    qkv = _qkv(B, T, H, D, seed=T)
    cos, sin = ops.rope_cos_sin(T, D) if rope else (None, None)
    upstream = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(1)) if random_upstream else None
    fast = _attend(_torch_op, qkv, B, T, H, D, cos, sin, upstream)
    same = _attend(_generic, qkv, B, T, H, D, cos, sin, upstream)
    c64, s64 = (cos.double(), sin.double()) if rope else (None, None)
    up64 = None if upstream is None else upstream.double()
    ref = _attend(_generic, qkv.double(), B, T, H, D, c64, s64, up64)
    for name, f, s, r in zip(("out", "dqkv"), fast, same, ref, strict=True):
        assert f.dtype == torch.float32
        # flash-attention's parity rule: |fast - ref| <= 2 |torch - ref| + atol
        assert ((f.double() - r).abs() <= 2 * (s.double() - r).abs() + 1e-5).all(), name


def test_cpu_flash_output_has_the_kernels_layout_and_no_grad_works():
    B, T, H, D = 2, 9, 2, 16
    qkv = _qkv(B, T, H, D, seed=4)
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    cos, sin = ops.rope_cos_sin(T, D)
    with torch.no_grad():
        o = _torch_op(q, k, v, cos, sin)
    assert o.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: the reshape to (B, T, C) is free
    torch.testing.assert_close(o, _generic(q, k, v, cos, sin))


def test_one_query_decoding_step_sees_every_key():
    """Tq = 1 after a cache of 11 positions: no mask is built; the result equals the
    float64 oracle's last row of causal attention over all 12 positions."""
    B, H, Tk, D = 1, 2, 12, 16
    qkv = _qkv(B, Tk, H, D, seed=11, dtype=torch.float64)
    q, k, v = qkv.view(B, Tk, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    cos, sin = ops.rope_cos_sin(Tk, D)
    full = reference64.rope_attention(q, k, v, cos.double(), sin.double())[:, :, -1:]
    step = _torch_op(q[:, :, -1:].float(), k.float(), v.float(), cos, sin)
    torch.testing.assert_close(step.double(), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_rotate_matches_float64_with_per_token_tables(grad, dtype):
    """ops.rope_rotate (what a KV cache stores): the lean path without autograd in fp32,
    apply_rope otherwise; per-row position tables (B, 1, T, D/2) as left-padded decoding
    builds them; gradients through the autograd path."""
    B, H, T, D = 3, 2, 7, 10
    x = torch.randn(B, H, T, D, dtype=dtype, requires_grad=grad)
    cos, sin = ops.rope_cos_sin(40, D)
    pos = torch.randint(0, 40, (B, T))
    c, s = cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, D/2)
    with torch.set_grad_enabled(grad):
        out = ops.rope_rotate(x, c, s)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference64.rotate(x.detach().double(), c.double(), s.double())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.detach().double(), ref, **tol)
    if grad:
        upstream = torch.randn_like(out)
        out.backward(upstream)
        # R is orthogonal: the gradient is R^T upstream, the inverse rotation (angle -> -angle)
        ref_grad = reference64.rotate(upstream.double(), c.double(), -s.double())
        torch.testing.assert_close(x.grad.double(), ref_grad, **tol)
