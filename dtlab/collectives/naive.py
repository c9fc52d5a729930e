"""Naive all-reduce: everything to rank 0 and back (the bottleneck the ring removes)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dtlab.measure.comm_counter import CommCounter, nbytes


def naive_all_reduce(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Every rank sends its whole tensor to rank 0, which sums and sends the result back to
    each: rank 0 moves 2(W-1) full copies, the bottleneck the ring removes."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sent = 0
    if rank == 0:
        buf = torch.empty_like(t)
        for src in range(1, world):
            dist.recv(buf, src)
            t.add_(buf)
        for dst in range(1, world):
            dist.send(t, dst)
            sent += nbytes(t)
    else:
        dist.send(t, 0)
        dist.recv(t, 0)
        sent = nbytes(t)
    if counter is not None:
        counter.record("all_reduce", t, sent_bytes=sent)
    return t
