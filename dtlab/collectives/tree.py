"""Binomial-tree all-reduce: log2(W) rounds up, the same rounds back down."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dtlab.measure.comm_counter import CommCounter, nbytes


def tree_all_reduce(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Binomial tree: in round k, ranks with bit k set send their partial sum to rank - 2^k and
    drop out; after ceil(log2 W) rounds rank 0 holds the sum, and the same tree run backwards
    broadcasts it. Fewer steps than the ring (2 log W vs 2(W-1)) but each moves the whole
    tensor, so it suits small, latency-bound messages."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sent, buf, k = 0, torch.empty_like(t), 1
    while k < world:  # reduce towards rank 0
        if rank % (2 * k) == k:
            dist.send(t, rank - k)
            sent += nbytes(t)
            break
        if rank % (2 * k) == 0 and rank + k < world:
            dist.recv(buf, rank + k)
            t.add_(buf)
        k *= 2
    k = 1
    while k < world:
        k *= 2
    while k > 1:  # broadcast back down the same tree
        k //= 2
        if rank % (2 * k) == 0 and rank + k < world:
            dist.send(t, rank + k)
            sent += nbytes(t)
        elif rank % (2 * k) == k:
            dist.recv(t, rank - k)
    if counter is not None:
        counter.record("all_reduce", t, sent_bytes=sent)
    return t
