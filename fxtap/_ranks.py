"""Torchrun for ``fxtap.extract``: the rank and world size, barriers, and sums over ranks (gloo)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

__all__ = ["barrier", "process_group", "sum_over_ranks"]


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)``; under torchrun, a gloo process group for the barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(days=1))  # ranks may finish hours apart
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(world: int, computed: int, reused: int) -> tuple[int, int]:
    if world <= 1:
        return computed, reused
    import torch.distributed as dist

    counts = torch.tensor([computed, reused])
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])
