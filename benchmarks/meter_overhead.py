"""How much the per-op meter (tsfast.meter) slows a small training step.

    uv run python benchmarks/meter_overhead.py [--steps 30] [--device cpu]

A GPT-like stack built only from tsfast.ops calls (4 layers, width 128, 4 heads, T=128,
batch 8, vocab 8192: 18 op calls a step) runs forward + backward + SGD update with the
meter off and on, alternating so that load on a shared machine hits both alike; it prints
the median step time of each and the overhead (the issue's budget: at most 3%).

On a busy machine the difference of two step medians is mostly noise, so the meter's own
cost is also measured directly: the fastest of many forward+backward calls of a tiny op
with the meter on, minus the same off, is what each metered call adds; times the calls in
a step, over the step time, it gives a second, steadier estimate of the overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tsfast import meter, ops


def make_model(layers: int, width: int, vocab: int, device: str):
    def w(*shape):
        scale = shape[-1] ** -0.5 if len(shape) > 1 else 0.0
        t = torch.randn(*shape, device=device) * scale + (1.0 if len(shape) == 1 else 0.0)
        return t.requires_grad_()

    blocks = [dict(ln1_w=w(width), ln1_b=w(width), qkv=w(3 * width, width), proj=w(width, width),
                   ln2_w=w(width), ln2_b=w(width), fc=w(4 * width, width), fc2=w(width, 4 * width))
              for _ in range(layers)]
    return dict(blocks=blocks, wte=w(vocab, width), lnf_w=w(width), lnf_b=w(width))


def parameters(model):
    return [model["wte"], model["lnf_w"], model["lnf_b"], *(p for b in model["blocks"] for p in b.values())]


def train_step(model, idx, targets, heads, cos, sin, lr=1e-3):
    batch, seq = idx.shape
    width = model["wte"].shape[1]
    x = model["wte"][idx]
    for b in model["blocks"]:
        q, k, v = ops.layernorm_linear(x, b["ln1_w"], b["ln1_b"], b["qkv"]).view(
            batch, seq, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        att = ops.rope_attention(q, k, v, cos, sin)
        x = x + att.transpose(1, 2).reshape(batch, seq, width) @ b["proj"].t()
        x = x + ops.layernorm_linear(x, b["ln2_w"], b["ln2_b"], b["fc"], activation="gelu_tanh") @ b["fc2"].t()
    h = ops.layer_norm(x, model["lnf_w"], model["lnf_b"]).view(batch * seq, width)
    loss = ops.linear_cross_entropy(h, model["wte"], targets.view(-1))
    loss.backward()
    with torch.no_grad():
        for p in parameters(model):
            p -= lr * p.grad
            p.grad = None
    return loss.detach()


def per_call_overhead_s(device: str, repeats: int = 300) -> float:
    """Fastest metered forward+backward of a tiny layer_norm minus the fastest unmetered one."""
    x = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)

    def fastest(metered: bool) -> float:
        best = float("inf")
        for _ in range(repeats):
            if metered:
                meter.enable()
            start = time.perf_counter()
            ops.layer_norm(x, w, None).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
            meter.disable()
        return best

    fastest(False), fastest(True)  # warm-up
    return fastest(True) - fastest(False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps with the meter on (and as many off)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    layers, width, heads, seq, batch, vocab = 4, 128, 4, 128, 8, 8192
    model = make_model(layers, width, vocab, args.device)
    idx = torch.randint(0, vocab, (batch, seq), device=args.device)
    targets = torch.randint(0, vocab, (batch, seq), device=args.device)
    cos, sin = ops.rope_cos_sin(seq, width // heads, device=args.device)

    def timed(metered: bool) -> float:
        if metered:
            meter.enable()
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, idx, targets, heads, cos, sin)
        if metered:
            lines = meter.active().lines(1.0)  # resolving the records is part of the cost
            meter.disable()
            assert len(lines) == 4
        elif args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up
        timed(False), timed(True)
    off, on = [], []
    for _ in range(args.steps):
        off.append(timed(False))
        on.append(timed(True))
    med_off, med_on = statistics.median(off), statistics.median(on)
    calls = layers * 3 + 2
    per_call = per_call_overhead_s(args.device)
    print(f"step (meter off): median {1e3 * med_off:.1f} ms, fastest {1e3 * min(off):.1f} ms, over {args.steps} steps")
    print(f"step (meter on):  median {1e3 * med_on:.1f} ms, fastest {1e3 * min(on):.1f} ms")
    print(f"overhead from step medians: {100 * (med_on / med_off - 1):+.2f}%; "
          f"from the fastest steps: {100 * (min(on) / min(off) - 1):+.2f}%")
    print(f"meter cost per op call (forward+backward): {1e6 * per_call:.0f} us; "
          f"x {calls} calls a step = {100 * per_call * calls / min(off):.2f}% of the fastest step")

if __name__ == "__main__":
    main()
