"""The tied output layer for batched decoding: logits (B, V) from the last hidden states (B, C).

A decoding step's output layer is a (B, C) x (C, V) matrix product with a small B and a
large V (50,257 x 256 at baby_cpu: a 51 MB weight). For B = 1 BLAS runs a matrix-vector
product that streams the weight once. For B > 1 it runs a GEMM, and a GEMM first packs the
weight into its blocked layout on every call. At baby_cpu that packing made 8 rows cost
~2.8x one row on this project's 2-core CPU (3.9 vs 1.4 ms).

On CPUs with MKL this module packs the weight once instead, through the ops that PyTorch's
own CPU inference path (torch.compile's freezing) uses: `torch.ops.mkl._mkl_reorder_linear_weight`
and `_mkl_linear`. Eight rows then cost ~1.2x one row (1.7 ms). A packed GEMM serves exactly
the row count it was packed for, so batches of 2 or more rows are padded to `rows`. A single
row keeps the matrix-vector product, which is faster than a padded GEMM.

The packed copy costs memory (about 85 MB beside baby_cpu's 51 MB weight, 60 MB beside
gpt2's 154 MB) and ~20 ms to make, once, when the layer is made. It is made again when the
weight changes in place (its version counter moves), so a decoder never reads stale
weights. Without MKL (Apple silicon, ARM), on GPUs, and for weights that are not
float32, the layer is a plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["OutputLayer", "packed_gemm_available"]


def packed_gemm_available() -> bool:
    """Whether this PyTorch build has MKL's packed GEMM ops."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class OutputLayer:
    """logits = hidden @ weight[:vocab].T for up to `rows` rows at once (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, rows: int):
        self.weight, self.vocab_size, self.rows = weight, vocab_size, rows
        self.packs = (rows > 1 and weight.device.type == "cpu" and weight.dtype == torch.float32
                      and packed_gemm_available())
        self._packed: torch.Tensor | None = None
        self._version = -1
        if self.packs:
            self._pack()  # now, so that the first step is not the one that waits for it

    def _pack(self) -> None:
        self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), self.rows)
        self._version = self.weight._version

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, C) with B <= rows -> logits (B, vocab_size)."""
        B = h.shape[0]
        if B > self.rows:
            raise ValueError(f"{B} rows, but the output layer was made for at most {self.rows}")
        if not self.packs or B == 1:
            return F.linear(h, self.weight)[:, : self.vocab_size]
        if self._version != self.weight._version:
            self._pack()
        if B < self.rows:
            h = torch.cat([h, h.new_zeros(self.rows - B, h.shape[1])])
        logits = torch.ops.mkl._mkl_linear(h.contiguous(), self._packed, self.weight.detach(), None, self.rows)
        return logits[:B, : self.vocab_size]
