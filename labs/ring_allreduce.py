"""Ring all-reduce, written out with point-to-point messages, beside a naive and a tree variant.

Answers QUESTIONS.md 2 (point-to-point vs collective communication) and 35 (why the ring: every
rank sends 2(W-1)/W of the tensor however many ranks there are, so the time per byte stays flat
as W grows, while the naive reduce-to-one-rank makes rank 0 send and receive (W-1) whole copies).

The ring, on a tensor cut into W chunks, rank r talking only to its neighbours r+1 and r-1:
  1. reduce-scatter, W-1 steps: at step s send chunk (r-s) to the right, receive chunk (r-s-1)
     from the left and add it into the local copy. Afterwards rank r holds the full sum of chunk
     (r+1).
  2. all-gather, W-1 steps: at step s send chunk (r+1-s) to the right, receive chunk (r-s) from
     the left and store it. Afterwards every rank holds every summed chunk.
Chunks may be uneven (length not divisible by W) or empty (length < W); both sides know every
chunk's size, so an empty chunk is simply not sent.

The lab first checks each algorithm against ``dist.all_reduce`` at lengths 1, 7, W-1 and 1000003
and counts the bytes every rank actually sends (``extra.checks``), then trains the shared model
with gradients averaged by the chosen algorithm and compares with the baseline.

Run:
    torchrun --nproc_per_node=3 -m labs.ring_allreduce --steps 10
    dtlab run ring_allreduce --nproc 4 --algo tree
"""
from __future__ import annotations

import argparse
import re
import sys
import threading

import torch
import torch.distributed as dist

from labs.core.comm import CommCounter, flatten, nbytes, unflatten_into
from labs.core.train import Strategy, add_common_args, run_lab


def chunk_sizes(n: int, world: int) -> list[int]:
    """Sizes of the W chunks of an n-element tensor: the first n % W chunks get one more."""
    base, extra = divmod(n, world)
    return [base + (1 if i < extra else 0) for i in range(world)]


# Big chunks travel in pieces so that adding one piece overlaps the transfer of the next: about
# 4 pieces a chunk, each between 256 KiB and 4 MiB of fp32 (measured best on loopback TCP).
MIN_SEGMENT, MAX_SEGMENT = 1 << 16, 1 << 20


def segment_elems(chunk_numel: int) -> int:
    return max(MIN_SEGMENT, min(MAX_SEGMENT, chunk_numel // 4))


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int,
              reduce: bool = False, scratch: torch.Tensor | None = None) -> int:
    """Send one chunk to ``dst`` while receiving one from ``src`` (both at once, so neither side
    waits for the other), then add the received chunk into ``recv`` (reduce-scatter) or leave it
    there (all-gather). Large chunks go as segments, all posted at once: the adding of segment i
    overlaps with the transfer of segment i+1. Returns the bytes sent."""
    # Both ends cut a chunk the same way because the cut depends on that chunk's size alone.
    sends = [dist.isend(part, dst, tag=i) for i, part in
             enumerate(send.split(segment_elems(send.numel()))) if part.numel()]
    seg = segment_elems(recv.numel())
    target = scratch[:recv.numel()] if reduce else recv
    segs = list(zip(target.split(seg), recv.split(seg)))
    recvs = [dist.irecv(t, src, tag=i) for i, (t, _) in enumerate(segs) if t.numel()]
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


def ring_all_reduce(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place, with a ring of isend/irecv."""
    world, rank = dist.get_world_size(), dist.get_rank()
    flat = t.view(-1)
    if world == 1:
        return t
    chunks = list(flat.split(chunk_sizes(flat.numel(), world)))
    right, left = (rank + 1) % world, (rank - 1) % world
    sent = 0
    scratch = _scratch(chunks[0].numel(), t.dtype, t.device)
    for s in range(world - 1):  # reduce-scatter
        send_i, recv_i = (rank - s) % world, (rank - s - 1) % world
        sent += _exchange(chunks[send_i], right, chunks[recv_i], left, reduce=True,
                          scratch=scratch)
    for s in range(world - 1):  # all-gather
        send_i, recv_i = (rank + 1 - s) % world, (rank - s) % world
        sent += _exchange(chunks[send_i], right, chunks[recv_i], left)
    if counter is not None:
        counter.record("all_reduce", t, sent_bytes=sent)
    return t


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


ALGORITHMS = {"ring": ring_all_reduce, "naive": naive_all_reduce, "tree": tree_all_reduce}


def check_against_library(world: int, rank: int, lengths: list[int]) -> list[dict]:
    """Every algorithm at every length against dist.all_reduce, with the bytes each rank sent.
    Returns rank 0's view; every rank's sent bytes are gathered so the ring's per-rank count
    (2(W-1)/W of the tensor, up to the uneven chunks) is checked for all of them."""
    results = []
    for n in lengths:
        g = torch.Generator().manual_seed(1000 * n + rank)
        x = torch.randn(n, generator=g)
        expected = x.clone()
        dist.all_reduce(expected)
        for name, fn in ALGORITHMS.items():
            counter = CommCounter(world)
            got = fn(x.clone(), counter)
            err = (got - expected).abs().max().item()
            tol = 1e-5 * max(1.0, expected.abs().max().item())
            sent = torch.tensor([counter.by_op["all_reduce"]["sent_bytes"]], dtype=torch.float64)
            all_sent = [torch.zeros_like(sent) for _ in range(world)]
            dist.all_gather(all_sent, sent)
            all_sent = [int(s.item()) for s in all_sent]
            row = {"algo": name, "length": n, "max_abs_err": err, "ok": bool(err <= tol),
                   "sent_bytes_per_rank": all_sent}
            if name == "ring":
                # Rank r skips chunk r+1 in reduce-scatter and chunk r+2 in all-gather:
                # exactly 2*total - those two chunks, i.e. 2(W-1)/W of the tensor when even.
                sizes = chunk_sizes(n, world)
                want = [4 * (2 * n - sizes[(r + 1) % world] - sizes[(r + 2) % world])
                        for r in range(world)]
                row["ring_theory_bytes"] = 2 * (world - 1) / world * 4 * n
                row["expected_sent_bytes"] = want
                row["ok"] = row["ok"] and all_sent == want
            results.append(row)
    return results


class RingDataParallel(Strategy):
    """Data parallelism at its plainest: after backward, one all-reduce of all gradients,
    flattened into one buffer, with the chosen hand-written algorithm; then divide by W."""

    name = "ring_allreduce"

    def __init__(self, rt, settings, algo: str = "ring", check_lengths: list[int] | None = None):
        super().__init__(rt, settings)
        self.algo = ALGORITHMS[algo]
        self.variant = algo
        self.check_lengths = check_lengths

    def build(self) -> None:
        super().build()
        if self.rt.distributed and self.check_lengths:
            self.extra["checks"] = check_against_library(self.rt.world_size, self.rt.rank,
                                                         self.check_lengths)
            self.checks_ok = all(c["ok"] for c in self.extra["checks"])

    def after_backward(self) -> None:
        if not self.rt.distributed:
            return
        grads = [p.grad for p in self.model.parameters()]
        flat = flatten(grads)
        self.algo(flat, self.comm)
        unflatten_into(flat.div_(self.rt.world_size), grads)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.ring_allreduce", description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="ring", choices=list(ALGORITHMS),
                   help="all-reduce used for training (every one is checked first)")
    p.add_argument("--check-lengths", default="1,7,W-1,1000003",
                   help="tensor lengths to check against dist.all_reduce; W stands for the "
                        "world size (default 1,7,W-1,1000003; '' to skip)")
    return add_common_args(p)


def parse_lengths(spec: str, world: int) -> list[int]:
    """'1,7,W-1,1000003' -> [1, 7, world-1, 1000003], dropping duplicates and lengths < 1."""
    from labs.core.train import UsageError
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = re.fullmatch(r"(\d+)|W(?:([+-])(\d+))?", item)
        if not m:
            raise UsageError(f"--check-lengths: {item!r} is not a length; use integers or "
                             "W, W-1, W+2 style terms, e.g. 1,7,W-1,1000003")
        if m.group(1):
            n = int(m.group(1))
        else:
            n = world + (int(m.group(3) or 0) * (-1 if m.group(2) == "-" else 1))
        if n >= 1 and n not in out:
            out.append(n)
    return out


def make_strategy(rt, settings, args) -> Strategy:
    return RingDataParallel(rt, settings, args.algo, parse_lengths(args.check_lengths,
                                                                  rt.world_size))


def main(argv=None) -> int:
    return run_lab("ring_allreduce", make_parser(), make_strategy, argv)


if __name__ == "__main__":
    sys.exit(main())
