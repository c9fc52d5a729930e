"""3D parallelism: data x pipeline x tensor parallel on one grid of ranks.

Answers QUESTIONS.md 7, 14 and 18. The W = DP x PP x TP ranks form a grid; rank
    r = (dp * PP + pp) * TP + tp
so consecutive ranks share a TP group (on a real cluster: the GPUs of one node, joined by
NVLink), a pipeline runs across the TP groups of one DP replica (its stages may sit on different
nodes: only boundary activations travel), and the DP replicas are outermost (one gradient
all-reduce per step, overlappable with the next step's work). This file only composes:
- tensor parallelism from tensor_parallel.py, each TP group with its own process group;
- the pipeline schedule from pipeline.py, with neighbours at the same TP index one stage away;
- data parallelism: after the pipeline's backward, every parameter's gradient is averaged over
  the DP group of ranks that hold the same (pp, tp) shard.

Run:
    torchrun --nproc_per_node=4 -m labs.parallel3d --dp 1 --pp 2 --tp 2 --preset small
    dtlab run parallel3d --nproc 8 --dp 2 --pp 2 --tp 2 --preset small
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from labs import tensor_parallel as tpl
from labs.core.comm import flatten, nbytes, ring_sent_bytes, unflatten_into
from labs.core.data import check_divisible
from labs.core.train import Strategy, UsageError, add_common_args, run_lab
from labs.pipeline import SCHEDULES, OwnPipeline


def grid_coords(rank: int, pp: int, tp: int) -> tuple[int, int, int]:
    """(dp, pp, tp) coordinates of a rank; TP varies fastest, DP slowest."""
    return rank // (pp * tp), (rank // tp) % pp, rank % tp


def grid_rank(d: int, p: int, t: int, pp: int, tp: int) -> int:
    return (d * pp + p) * tp + t


class Parallel3D(OwnPipeline):
    name = "parallel3d"

    def __init__(self, rt, settings, dp, pp, tp, schedule, microbatches):
        super().__init__(rt, settings, schedule, microbatches, 0.0)
        self.dp, self.pp, self.tp = dp, pp, tp
        self.d, self.p, self.t = grid_coords(rt.rank, pp, tp)
        self.variant = f"dp{dp}-pp{pp}-tp{tp}-{schedule}"
        # Every rank must create every group, in the same order, even those it is not in.
        self.tp_group = self.dp_group = None
        for d in range(dp):
            for p in range(pp):
                g = dist.new_group([grid_rank(d, p, t, pp, tp) for t in range(tp)])
                if (d, p) == (self.d, self.p):
                    self.tp_group = g
        for p in range(pp):
            for t in range(tp):
                g = dist.new_group([grid_rank(d, p, t, pp, tp) for d in range(dp)])
                if (p, t) == (self.p, self.t):
                    self.dp_group = g

    # the data-parallel coordinate decides the rows; TP and PP ranks of a replica share them
    @property
    def dp_world(self) -> int:
        return self.dp

    @property
    def dp_rank(self) -> int:
        return self.d

    def pipeline_position(self):
        prev = grid_rank(self.d, self.p - 1, self.t, self.pp, self.tp) if self.p > 0 else None
        nxt = grid_rank(self.d, self.p + 1, self.t, self.pp, self.tp) \
            if self.p < self.pp - 1 else None
        return self.p, self.pp, prev, nxt

    def build(self) -> None:
        tpl.COUNTER, tpl.TP_GROUP = self.comm, self.tp_group
        super().build()  # the full model, this rank's stage, the schedule
        self.shard_dims, self.vocab_lo = tpl.shard_layers(self.full, range(self.lo, self.hi),
                                                          self.tp, self.t)
        self.optimizer = self.make_optimizer(self.stage.parameters())  # the shards' parameters
        self.extra.update(grid={"dp": self.dp, "pp": self.pp, "tp": self.tp},
                          coords=[self.d, self.p, self.t])

    def stage_loss(self, out, y):
        if self.tp == 1:
            return super().stage_loss(out, y)
        return tpl.vocab_parallel_loss(out, y, self.vocab_lo)

    def after_backward(self) -> None:
        """Data parallelism: average every gradient over the replicas holding the same shard."""
        if self.dp == 1:
            return
        grads = [p.grad for p in self.stage.parameters()]
        flat = flatten(grads)
        self.comm.record("all_reduce", flat,
                         sent_bytes=ring_sent_bytes("all_reduce", nbytes(flat), self.dp))
        dist.all_reduce(flat, group=self.dp_group)
        unflatten_into(flat.div_(self.dp), grads)

    def global_loss(self, local_loss):
        """The last stage of every replica knows its replica's loss (every TP rank of it the
        same value): sum over the last stages' TP-rank-0 ranks, divide by DP."""
        keep = self.next_rank is None and self.t == 0
        t = local_loss.detach().clone() if keep else torch.zeros((), device=self.rt.device)
        dist.all_reduce(t)
        return t.item() / self.dp

    def full_state(self):
        """Replica 0's shards, joined along TP and put together across stages, on rank 0."""
        mine = {n: p.detach().cpu() for n, p in self.full.named_parameters()
                if self.lo <= int(n.split(".")[1]) < self.hi}
        layouts = self.gather_object(self.shard_dims)  # which entries are cut, and along what
        parts = self.gather_object((self.d, self.p, self.t, mine))
        if not self.rt.is_main:
            return None
        dims = {k: v for lay in layouts for k, v in lay.items()}
        out = {}
        for p in range(self.pp):
            shards = [sd for d, pp_, t, sd in sorted(parts, key=lambda x: x[:3])
                      if d == 0 and pp_ == p]
            out.update(tpl.join_shards(shards[0], shards, dims))
        return out

    def close(self) -> None:
        Strategy.close(self)  # the schedule's timeline analysis assumes one pipeline: skip it


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.parallel3d", description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
    p.add_argument("--microbatches", type=int, default=2)
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    if min(args.dp, args.pp, args.tp) < 1:
        raise UsageError("--dp, --pp and --tp must be >= 1")
    if args.dp * args.pp * args.tp != world:
        raise UsageError(f"world size {world} != dp x pp x tp = {args.dp} x {args.pp} x "
                         f"{args.tp} = {args.dp * args.pp * args.tp}; make --nproc equal their "
                         "product")
    cfg = settings.model
    if cfg.n_head % args.tp or cfg.d_ff % args.tp:
        raise UsageError(f"--tp {args.tp} must divide n_head={cfg.n_head} and d_ff={cfg.d_ff} of "
                         f"preset {settings.preset!r}")
    if args.pp > cfg.n_layer:
        raise UsageError(f"--pp {args.pp} exceeds the {cfg.n_layer} blocks of preset "
                         f"{settings.preset!r}")
    rows = check_divisible(settings.batch_size, args.dp, what="--dp")
    if args.microbatches < 1 or rows % args.microbatches:
        raise UsageError(f"--microbatches {args.microbatches} must divide the {rows} rows each "
                         "data-parallel replica gets")


def make_strategy(rt, settings, args) -> Strategy:
    return Parallel3D(rt, settings, args.dp, args.pp, args.tp, args.schedule, args.microbatches)


def main(argv=None) -> int:
    return run_lab("parallel3d", make_parser(), make_strategy, argv, check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
