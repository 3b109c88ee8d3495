"""Small collectives used across the harness, each a no-op (or the identity) without a process group."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` if initialised, else the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    """True when a process group of more than one rank exists."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """``dist.barrier()`` when a process group exists."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_floats(values: Sequence[float], op: str, device: torch.device) -> List[float]:
    """All-reduce a list of floats over ranks (``op``: ``sum`` | ``max``); identity without a process group.
    The tensor goes to ``device`` because NCCL reduces only CUDA tensors."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()
