"""FLOP accounting: the OpCost record every op module's cost formula returns, the whole-model
FLOPs per token and the GPUs' peaks for MFU. Each op's own formula lives with the op
(tsfast/ops/<family>.py); the per-op meter, the benchmarks and the training loop read them
from there.

Conventions (followed by the op modules):
- A multiply-add is 2 FLOPs. Matrix products count only the products (softmax, LayerNorm,
  GELU and rotary are a few FLOPs per element next to C or D multiply-adds, and omitted).
- Attention forward: two (T x D) @ (D x T) products per head, 4·B·H·T²·D; causal halves it
  (the FlashAttention convention, T²/2 rather than T(T+1)/2). Backward: 2.5x forward
  (five products instead of two: dV, dP, dS->dQ, dS->dK, plus the recomputed P's QK^T).
- Linear ops: 2·N·C·F forward; backward 4·N·C·F (dX and dW).
- Memory-bound ops (layer_norm, cross_entropy) are measured in bytes moved: each tensor
  read or written once, as an ideal fused kernel would.
- linear_cross_entropy computes its gradients in the forward (one pass over the logits), so
  its forward counts 2·N·C·V for the logits plus 4·N·C·V for dh and dW when grads are needed;
  its backward only rescales (0 FLOPs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class OpCost:
    """What one call of an op does: FLOPs (compute-bound ops) or bytes (memory-bound ones)."""

    forward: float
    backward: float
    unit: str  # "tflops": forward/backward are FLOPs; "gbps": they are bytes

    def rate(self, amount: float, seconds: float) -> float:
        """Throughput in the op's unit (TFLOP/s or GB/s) for `amount` done in `seconds`."""
        if seconds <= 0:
            return 0.0
        return amount / seconds / (1e12 if self.unit == "tflops" else 1e9)


# ----------------------------------------------------------------------------- shared formulas


def linear_flops(rows: int, in_features: int, out_features: int) -> float:
    """Forward FLOPs of an (N, C) @ (C, F) product (a multiply-add is 2 FLOPs); used by
    layernorm_linear and linear_cross_entropy."""
    return 2.0 * rows * in_features * out_features


# ----------------------------------------------------------------------------- whole model


def gpt_flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int,
                        block_size: int) -> float:
    """Training FLOPs per token (forward + backward) of a GPT: 6 per parameter (2 forward,
    4 backward) plus attention's 12·L·H·hd·T (the PaLM appendix B count, without the causal
    halving). `n_params` counts a tied embedding once."""
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * block_size


# Dense (no 2:4 sparsity) bf16 tensor-core peaks with fp32 accumulate, TFLOP/s.
# Sources: NVIDIA datasheets for A100 (SXM/PCIe), H100 (SXM; PCIe 756), H200, GH200, A10,
# L4, L40S; the Ampere GA102 whitepaper (RTX 3090) and the Ada whitepaper (RTX 4090), both
# with fp32 accumulate.
# A10G (AWS's A10 variant) is left out: NVIDIA publishes no tensor-core figure for it.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A10": 125.0,
    "L4": 121.0,
    "L40S": 362.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as torch.cuda.get_device_name() names it
    ("NVIDIA H100 80GB HBM3"), or None for a device not in PEAK_TFLOPS."""
    # Longest key first, so "H100 PCIe" wins over "H100"; word boundaries keep "A10"
    # from matching "A100" or "A10G".
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
            return PEAK_TFLOPS[key]
    return None


def mfu(flops_per_second: float, device_name: str, n_devices: int = 1) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over the devices' summed peak, or None."""
    peak = peak_tflops(device_name)
    return None if peak is None else flops_per_second / (peak * 1e12 * n_devices)
