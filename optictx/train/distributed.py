"""The process group of a torchrun job: who am I, join it, agree on a flag, wait for everyone.

Its own module because both the loop and the checkpoint writer ask "rank, world?", and the loop imports the
checkpoint writer. In a single process every helper is a no-op (rank 0 of 1).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join a torchrun job when WORLD_SIZE>1 (gloo on CPU, nccl on GPU); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank: a time-based choice (checkpoint now?) made by each rank's own
    clock could differ, and a collective that only some ranks enter hangs."""
    if dist_info()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()
