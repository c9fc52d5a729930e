"""Ring all-reduce from point-to-point messages (docs/ring-allreduce.md).

On a tensor cut into W chunks, rank r talks only to its neighbours r+1 and r-1:
  1. reduce-scatter, W-1 steps: at step s send chunk (r-s) to the right, receive chunk (r-s-1)
     from the left and add it into the local copy. Afterwards rank r holds the full sum of chunk
     (r+1).
  2. all-gather, W-1 steps: at step s send chunk (r+1-s) to the right, receive chunk (r-s) from
     the left and store it. Afterwards every rank holds every summed chunk.
Every rank sends 2(W-1)/W of the tensor however many ranks there are. Chunks may be uneven
(length not divisible by W) or empty (length < W); both sides know every chunk's size, so an
empty chunk is simply not sent.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from dtlab.measure.comm_counter import CommCounter, nbytes


def chunk_sizes(n: int, world: int) -> list[int]:
    """Sizes of the W chunks of an n-element tensor: the first n % W chunks get one more."""
    base, extra = divmod(n, world)
    return [base + (1 if i < extra else 0) for i in range(world)]


def schedule(rank: int, world: int) -> list[tuple[str, int, int]]:
    """Rank ``rank``'s steps: (phase, chunk it sends to the right, chunk it receives from the
    left), W-1 reduce-scatter steps then W-1 all-gather steps (the module docstring's rule)."""
    return [("reduce-scatter", (rank - s) % world, (rank - s - 1) % world)
            for s in range(world - 1)] + \
        [("all-gather", (rank + 1 - s) % world, (rank - s) % world) for s in range(world - 1)]


# Big chunks travel in pieces so that adding one piece overlaps the transfer of the next: about
# 4 pieces a chunk, each between 256 KiB and 4 MiB of fp32 (bounds picked with dtlab bench comm).
MIN_SEGMENT, MAX_SEGMENT = 1 << 16, 1 << 20


def segment_elems(chunk_numel: int) -> int:
    return max(MIN_SEGMENT, min(MAX_SEGMENT, chunk_numel // 4))


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int,
              reduce: bool = False, scratch: torch.Tensor | None = None, group=None) -> int:
    """Send one chunk to ``dst`` while receiving one from ``src`` (both at once, so neither side
    waits for the other), then add the received chunk into ``recv`` (reduce-scatter) or leave it
    there (all-gather). Large chunks go as segments, all posted at once: the adding of segment i
    overlaps with the transfer of segment i+1. Returns the bytes sent."""
    # Both ends cut a chunk the same way because the cut depends on that chunk's size alone.
    seg = segment_elems(recv.numel())
    target = scratch[:recv.numel()] if reduce else recv
    segs = list(zip(target.split(seg), recv.split(seg)))
    # Receives first: gloo holds a send until the peer has a receive posted, so when both ends
    # send first their transfers serialise (measured across two nodes: each direction got
    # about half the link); posted first, both directions of the link carry data at once.
    recvs = [dist.irecv(t, src, group=group, tag=i) for i, (t, _) in enumerate(segs) if t.numel()]
    sends = [dist.isend(part, dst, group=group, tag=i) for i, part in
             enumerate(send.split(segment_elems(send.numel()))) if part.numel()]
    for work, (t, r) in zip(recvs, segs):
        work.wait()
        if reduce:
            r.add_(t)
    for w in sends:
        w.wait()
    return nbytes(send)


_SCRATCH = threading.local()  # one buffer per thread (our DDP runs rings on its comm thread)


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A receive buffer kept between calls: allocating (and first touching) tens of MiB on every
    all-reduce costs as much as a good part of the transfer."""
    cache = _SCRATCH.__dict__
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = cache[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def ring_all_reduce(t: torch.Tensor, counter: CommCounter | None = None,
                    group=None) -> torch.Tensor:
    """Sum ``t`` over all ranks (of ``group``, default all), in place, with a ring of
    isend/irecv."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flat = t.view(-1)
    if world == 1:
        return t
    chunks = list(flat.split(chunk_sizes(flat.numel(), world)))
    # neighbours in the group's order; the messages name them by their global rank
    right, left = ((rank + 1) % world, (rank - 1) % world) if group is None else \
        (dist.get_global_rank(group, (rank + 1) % world),
         dist.get_global_rank(group, (rank - 1) % world))
    sent = 0
    scratch = _scratch(chunks[0].numel(), t.dtype, t.device)
    for phase, send_i, recv_i in schedule(rank, world):
        if phase == "reduce-scatter":  # add what arrives into the local chunk
            sent += _exchange(chunks[send_i], right, chunks[recv_i], left, reduce=True,
                              scratch=scratch, group=group)
        else:  # all-gather: store it
            sent += _exchange(chunks[send_i], right, chunks[recv_i], left, group=group)
    if counter is not None:
        counter.record("all_reduce", t, sent_bytes=sent)
    return t
