"""The torch reference ops as oracle: float64 stays float64, int32 targets work."""

import torch
import torch.nn.functional as F

from tsfast import ops


def test_cross_entropy_float64_is_exact_and_int32_targets_work():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    logits = torch.randn(37, 101, dtype=torch.float64, generator=gen) * 5
    targets = torch.randint(0, 101, (37,), generator=gen)
    targets[::5] = -100
    with ops.use("torch"):
        for reduction in ("mean", "sum", "none"):
            out = ops.cross_entropy(logits, targets.int(), reduction=reduction)
            want = F.cross_entropy(logits, targets, reduction=reduction)
            assert out.dtype == torch.float64
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
