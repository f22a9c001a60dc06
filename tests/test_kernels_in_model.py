"""The whole model trained a few steps through the Triton kernels matches the torch backend.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it), so the model is
the `tiny` preset's architecture at a short context and a small batch.
"""

import pytest
import torch

from tsfast import ops
from tsfast.config import preset
from tsfast.model import GPT
from tsfast.testing import device_for_tests, interpreter_ready

pytestmark = pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready()))


def _train_losses(backend: str, steps: int, seed: int, pos: str) -> list[float]:
    cfg = preset("tiny")
    model_cfg = cfg.model_config(vocab_size=300)
    model_cfg.block_size, model_cfg.n_layer, model_cfg.pos = 24, 2, pos
    device = device_for_tests()
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, 300, (2, 25), generator=gen).to(device)  # one batch, memorized
    losses = []
    with ops.use(backend):
        for _ in range(steps):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("pos", ["rope", pytest.param("learned", marks=pytest.mark.slow)])
def test_tiny_steps_triton_match_torch(pos):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    triton_losses = _train_losses("triton", 3, seed, pos)
    torch_losses = _train_losses("torch", 3, seed, pos)
    assert triton_losses[-1] < triton_losses[0], triton_losses
    for step, (a, b) in enumerate(zip(triton_losses, torch_losses, strict=True)):
        assert abs(a - b) <= 1e-4, f"step {step} (seed {seed}): triton {a:.6f} vs torch {b:.6f}"
