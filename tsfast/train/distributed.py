"""DDP under torchrun: one process per device, NCCL on GPUs, gloo on CPU.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process.
Ranks must take the same decisions at the same step (stop on a signal, stop on a non-finite
loss), or one would wait forever in the next gradient all-reduce: `any_rank` agrees on such
flags over a gloo group, a CPU all-reduce that does not synchronize the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    flag_group: object = None  # gloo group for any_rank

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The process' place in a torchrun job (rank 0 of 1 when not under torchrun)."""
    if "RANK" not in os.environ:
        return Dist()
    return Dist(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init(d: Dist, device: torch.device) -> None:
    """Join the process group (a no-op for a single process)."""
    if not d.enabled:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        d.flag_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group(backend="gloo")
        d.flag_group = dist.group.WORLD


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.flag_group)
    return bool(t.item())


def broadcast_object(d: Dist, obj):
    """Rank 0's `obj` (any picklable value) on every rank, over the gloo group."""
    if not d.enabled:
        return obj
    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0, group=d.flag_group)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier(group=d.flag_group)


def shutdown(d: Dist, wait_for_peers: bool = False) -> None:
    """Leave the process group. After a finished run, first wait for every rank: rank 0 may
    still be sampling, and a gloo group torn down under a live peer aborts the process
    ("terminate called without an active exception", seen in CI). After an error, don't
    wait: the peers may be gone."""
    if d.enabled and dist.is_initialized():
        if wait_for_peers:
            dist.barrier(group=d.flag_group)
        dist.destroy_process_group()


class GradSyncProbe:
    """Test aid: a DDP communication hook that records at which (step, micro-step) gradients
    are all-reduced, then all-reduces them as DDP would."""

    def __init__(self, ddp_model):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.where = (0, 0)
        self.calls: list[tuple[int, int]] = []
        self._allreduce = default_hooks.allreduce_hook
        ddp_model.register_comm_hook(None, self._hook)

    def _hook(self, state, bucket):
        self.calls.append(self.where)
        return self._allreduce(state, bucket)
