"""The op layer: one module per op family, each routing every call to Triton or to PyTorch.

    from tsfast import ops
    ops.rope_attention(q, k, v, cos, sin, causal=True, doc_ids=None)   # ops/attention.py
    ops.layernorm_linear(x, ln_w, ln_b, w, b, activation="gelu_tanh")   # ops/layernorm.py
    ops.layer_norm(x, w, b)                                             # ops/layernorm.py
    ops.cross_entropy(logits, targets)                                  # ops/losses.py
    ops.linear_cross_entropy(h, w, targets)                             # ops/losses.py
    ops.use("auto" | "triton" | "torch")   # also a context manager; or TSFAST_KERNELS

Each op module holds its contract (the module docstring), argument checks, cost formula,
torch path, autocast behaviour and the registration of its Triton kernels as opaque
torch.library custom ops, and its candidates (the Triton path and the plain-PyTorch way,
among which --kernels auto measures on CUDA: ops/selection.py); tsfast/kernels/ holds the
kernels and their launchers. Backend selection: ops/_backend.py. The layers and the
numerics rule: docs/design.md.
"""

from tsfast.ops._backend import BACKENDS, BackendUnavailable, get_backend, triton_cannot_run, use
from tsfast.ops.attention import KERNEL_HEAD_DIMS, rope_attention
from tsfast.ops.layernorm import layer_norm, layernorm_linear
from tsfast.ops.losses import cross_entropy, linear_cross_entropy
from tsfast.ops.rotary import doc_positions, rope_cos_sin, rope_rotate

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "KERNEL_HEAD_DIMS",
    "use",
    "get_backend",
    "triton_cannot_run",
    "rope_attention",
    "layernorm_linear",
    "layer_norm",
    "cross_entropy",
    "linear_cross_entropy",
    "rope_cos_sin",
    "doc_positions",
    "rope_rotate",
]
