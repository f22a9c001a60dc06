"""The run's kernel choices under --kernels auto on CUDA, made before the first step.

Rank 0 runs the model eagerly once in training mode and once as evaluation runs it (no
gradients), on random tokens of the run's batch shape: each op call with a new key measures
its candidates there (tsfast/ops/selection.py). Every later call, compiled or not, only
looks its choice up, so torch.compile traces a fixed choice and every step of the run takes
the same paths. Under DDP the other ranks take rank 0's choices (broadcast) and measure
nothing, so every rank runs the same kernels. The RNG state is left as it was: the warm-up
changes neither the initial weights nor the dropout masks of the run.
"""

from __future__ import annotations

import torch

from tsfast.ops import _backend, selection
from tsfast.ops.attention import bench_doc_ids
from tsfast.train import distributed, runtime


def warm_up(model, batch_size: int, block_size: int, device: torch.device, dtype: torch.dtype,
            doc_mask: bool = False) -> None:
    """One eager forward in training mode and one under no_grad in eval mode (outputs dropped),
    with document masking (stories of `bench_doc_ids`) when the run uses it, so that the
    masked attention calls are measured as such."""
    was_training = model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        g = torch.Generator(device=device).manual_seed(0)
        idx = torch.randint(0, model.config.vocab_size, (batch_size, block_size), generator=g, device=device)
        doc_ids = bench_doc_ids(batch_size, block_size, device) if doc_mask else None
        try:
            model.train()
            with runtime.autocast(device, dtype):
                model(idx, idx, doc_ids=doc_ids)
            model.eval()
            with torch.no_grad(), runtime.autocast(device, dtype):
                model(idx, idx, doc_ids=doc_ids)
        finally:
            model.train(was_training)


def select(model, batch_size: int, block_size: int, device: torch.device, dtype: torch.dtype,
           d: distributed.Dist, doc_mask: bool = False) -> list[dict] | None:
    """Make the run's choices (rank 0) and share them (DDP); the records, or None when
    nothing is measured here (--kernels triton or torch, CPU, MPS)."""
    if not _backend.measures(device):
        return None
    records = None
    if d.is_main:
        warm_up(model, batch_size, block_size, device, dtype, doc_mask)
        records = selection.current().records()
    records = distributed.broadcast_object(d, records)
    if not d.is_main:
        mine = selection.Selector(cache_dir=None, measure=False)
        mine.install(records)
        selection.set_current(mine)
    return records
