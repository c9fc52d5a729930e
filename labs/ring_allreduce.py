"""Ring all-reduce from point-to-point messages, beside a naive and a tree variant, then used to
train.

The algorithms live in dtlab/collectives/ (ring.py first: reduce-scatter then all-gather around
the ring, every rank sending 2(W-1)/W of the tensor whatever W is; naive.py, where rank 0 moves
2(W-1) whole copies; tree.py, 2 log2 W rounds of whole tensors), because DDP and the benchmark use
them too. This lab first checks each one against ``dist.all_reduce`` at lengths 1, 7, W-1 and
1000003 and counts the bytes every rank actually sends (``extra.checks``), then trains the shared
model with gradients averaged by the chosen algorithm and compares with the baseline.

Explained in docs/ring-allreduce.md.

Run:
    torchrun --nproc_per_node=3 -m labs.ring_allreduce --steps 10
    dtlab run ring_allreduce --nproc 4 --algo tree
"""
from __future__ import annotations

import argparse
import re
import sys

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.collectives import ALGORITHMS
from dtlab.collectives.ring import chunk_sizes
from dtlab.measure.comm_counter import CommCounter, flatten, unflatten_into
from dtlab.train.data import check_divisible
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


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


def check_args(args, settings, world: int) -> None:
    check_divisible(settings.batch_size, world)
    parse_lengths(args.check_lengths, world)


def make_strategy(rt, settings, args) -> Strategy:
    return RingDataParallel(rt, settings, args.algo, parse_lengths(args.check_lengths,
                                                                  rt.world_size))


def main(argv=None) -> int:
    return run_lab(registry.get("ring_allreduce"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
