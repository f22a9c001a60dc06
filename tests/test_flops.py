"""FLOP formulas (each in its op module) against torch's own FLOP counter, and the peak table."""

import random

import pytest
import reference64
import torch
from torch.utils.flop_counter import FlopCounterMode

from tsfast import flops
from tsfast.ops import attention, layernorm, losses


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_linear_forward_and_backward_match_torch_counter():
    n, c, f = random.randint(3, 40), random.randint(3, 40), random.randint(3, 40)
    x, w = torch.randn(n, c, requires_grad=True), torch.randn(f, c, requires_grad=True)
    cost = layernorm.layernorm_linear_cost(n, c, f)
    y = None

    def forward():
        nonlocal y
        y = x @ w.t()

    assert _count(forward) == cost.forward
    assert _count(lambda: y.sum().backward()) == cost.backward


def test_attention_forward_matches_torch_counter_without_mask():
    b, h, t, d = random.randint(1, 3), random.randint(1, 3), random.randint(2, 30), random.choice([8, 16])
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    counted = _count(lambda: reference64.rope_attention(q, k, v, causal=False))
    assert counted == attention.attention_flops(b, h, t, d, causal=False) == 4 * b * h * t * t * d
    assert attention.attention_flops(b, h, t, d, causal=True) == counted / 2
    assert attention.rope_attention_cost(b, h, t, d, causal=False).backward == 2.5 * counted


def test_attention_with_a_cache_counts_the_unmasked_pairs():
    b, h, d, s = 1, 1, 8, random.randint(10, 50)
    full = attention.attention_flops(b, h, s, d, causal=True)
    # The last query row of a cache sees all s keys: nearly the non-causal cost of one row.
    one = attention.attention_flops(b, h, 1, d, causal=True, k_len=s)
    assert one == pytest.approx(4 * b * h * s * d, rel=1 / s)
    # Splitting the queries into a prefix and the rest adds up to the whole.
    p = s // 2
    prefix = attention.attention_flops(b, h, p, d, causal=True)
    rest = attention.attention_flops(b, h, s - p, d, causal=True, k_len=s)
    assert prefix + rest == pytest.approx(full)


def test_document_mask_counts_only_the_attended_pairs():
    """Documents of lengths 3, 1 and 4 in a row of 8: causal pairs 6 + 1 + 10 = 17 (not 36),
    non-causal 9 + 1 + 16 = 26 (not 64); decoding the last 2 queries: 3 + 4 = 7."""
    doc_ids = torch.tensor([[5, 5, 5, 6, 9, 9, 9, 9]])
    assert attention.attended_pairs(doc_ids, 8, causal=True) == 17
    assert attention.attended_pairs(doc_ids, 8, causal=False) == 26
    assert attention.attended_pairs(doc_ids, 2, causal=True) == 7
    assert attention.attention_flops(1, 2, 8, 16, pairs=17) == 4 * 2 * 17 * 16


def test_linear_cross_entropy_counts_grads_in_forward():
    n, c, v = 5, 7, 11
    h, w = torch.randn(n, c), torch.randn(v, c)
    logits = _count(lambda: h @ w.t())
    no_grad = losses.linear_cross_entropy_cost(n, c, v, with_grad=False)
    with_grad = losses.linear_cross_entropy_cost(n, c, v, with_grad=True)
    assert no_grad.forward == logits and with_grad.forward == 3 * logits
    assert with_grad.backward == 0


def test_memory_bound_ops_count_each_tensor_once():
    rows, width = random.randint(2, 100), random.randint(2, 100)
    ln = layernorm.layer_norm_cost(rows, width, 2)
    assert ln.unit == "gbps"
    assert ln.forward == 2 * rows * width * 2 + 2 * width * 2 + 8 * rows
    ce = losses.cross_entropy_cost(rows, width, 4)
    assert ce.forward == rows * width * 4 + 12 * rows
    assert ce.backward == 2 * rows * width * 4 + 12 * rows


def test_rate_units():
    assert flops.OpCost(2e12, 0, "tflops").rate(2e12, 0.5) == pytest.approx(4.0)
    assert flops.OpCost(1e9, 0, "gbps").rate(3e9, 2.0) == pytest.approx(1.5)
    assert flops.OpCost(1, 0, "gbps").rate(1, 0.0) == 0.0


def test_gpt_flops_per_token_matches_torch_counter_on_a_tiny_gpt():
    """Every parameter of this GPT sits in a matmul (no biases; the tied embedding is the
    LM head), so the counter's forward+backward FLOPs per token equal the formula exactly."""
    n_layer, n_head, head_dim, block, vocab = 2, 2, 8, 12, 30
    c = n_head * head_dim
    wte = torch.randn(vocab, c, requires_grad=True)
    layers = [[torch.randn(o, i, requires_grad=True) for o, i in
               ((3 * c, c), (c, c), (4 * c, c), (c, 4 * c))] for _ in range(n_layer)]
    n_params = wte.numel() + sum(w.numel() for layer in layers for w in layer)
    idx = torch.randint(0, vocab, (1, block))

    def train_step():
        x = wte[idx]
        for w_qkv, w_proj, w_fc, w_fc2 in layers:
            q, k, v = (x @ w_qkv.t()).view(1, block, 3, n_head, head_dim).permute(2, 0, 3, 1, 4)
            att = reference64.rope_attention(q, k, v, causal=False)
            x = x + att.transpose(1, 2).reshape(1, block, c) @ w_proj.t()
            x = x + torch.relu(x @ w_fc.t()) @ w_fc2.t()
        (x @ wte.t()).sum().backward()

    per_token = _count(train_step) / block
    assert per_token == flops.gpt_flops_per_token(n_params, n_layer, n_head, head_dim, block)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("cpu", None),
    ],
)
def test_peak_tflops_by_device_name(name, peak):
    assert flops.peak_tflops(name) == peak


def test_mfu():
    assert flops.mfu(989e12 / 2, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert flops.mfu(312e12, "NVIDIA A100-SXM4-40GB", n_devices=4) == pytest.approx(0.25)
    assert flops.mfu(1e12, "Apple M2") is None
