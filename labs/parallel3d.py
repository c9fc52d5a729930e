"""3D parallelism: data x pipeline x tensor parallel on one grid of ranks.

The W = DP x PP x TP ranks form a grid (dtlab/train/grid.py), TP fastest:
    rank = (dp * PP + pp) * TP + tp
so consecutive ranks share a TP group (on a real cluster: the GPUs of one node, joined by
NVLink), a pipeline runs across the TP groups of one DP replica (its stages may sit on different
nodes: only boundary activations travel), and the DP replicas are outermost (one gradient
all-reduce per step, overlappable with the next step's work). This file only composes, in the
order picotron and torchtitan apply theirs:
1. tensor parallelism: ``shard_layers`` from labs/tensor_parallel.py cuts this rank's stage
   layers for its TP group;
2. pipeline parallelism: ``run_schedule`` from labs/pipeline.py runs the schedule with the
   neighbours at the same TP index one stage away;
3. data parallelism: after the pipeline's backward, every gradient is averaged over the DP group
   of ranks that hold the same (pp, tp) shard.
``--cp C`` adds a fourth dimension, context parallelism, between PP and TP (rank =
((d * PP + p) * CP + c) * TP + t): ``cut_sequence`` from labs/context_parallel.py gives rank c of a
CP group the zig-zag chunks c and 2C-1-c of every sequence and puts ring attention in its blocks;
pipeline messages then carry only those tokens, and the gradient average of step 3 runs over the
DP x CP ranks holding the same shard.

Explained in docs/3d-parallel.md (and docs/context-parallel.md for ``--cp``).

Run:
    torchrun --nproc_per_node=4 -m labs.parallel3d --dp 1 --pp 2 --tp 2 --preset small
    torchrun --nproc_per_node=4 -m labs.parallel3d --dp 2 --pp 1 --tp 1 --cp 2 --preset long
    dtlab run parallel3d --nproc 8 --dp 2 --pp 2 --tp 2 --preset small
"""
from __future__ import annotations

import argparse
import sys
from functools import partial

import torch.distributed as dist

from dtlab import registry
from dtlab.measure.comm_counter import flatten, nbytes, ring_sent_bytes, unflatten_into
from dtlab.train.grid import Grid
from dtlab.train.layout import ParamLayout
from dtlab.train.model import ToyGPT
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy
from labs.context_parallel import Ring, cut_sequence, layout_chunks
from labs.pipeline import SCHEDULES, cut_stage, pipeline_loss, run_schedule
from labs.tensor_parallel import shard_layers, vocab_parallel_loss


class Parallel3D(Strategy):
    name = "parallel3d"

    def __init__(self, rt, settings, grid: Grid, schedule: str, microbatches: int):
        super().__init__(rt, settings)
        self.grid, self.schedule_name, self.m = grid.at(rt.rank), schedule, microbatches
        self.variant = f"dp{grid.dp}-pp{grid.pp}-tp{grid.tp}-{schedule}" + \
            ("-ppinner" if grid.order == "pp-inner" else "") + \
            (f"-cp{grid.cp}" if grid.cp > 1 else "")

    # the data-parallel coordinate decides the rows; TP and PP ranks of a replica share them
    @property
    def dp_world(self) -> int:
        return self.grid.dp

    @property
    def dp_rank(self) -> int:
        return self.grid.d

    def build(self) -> None:
        g = self.grid = self.grid.with_groups(self.rt.timeout_s)
        self.full = ToyGPT(self.settings.model).to(self.rt.device)   # the baseline's init
        self.pos = None
        if g.cp > 1:                                                   # 0. this rank's tokens
            seq = self.settings.model.seq_len
            self.pos = cut_sequence(self.full, Ring(g.cp_group, [
                layout_chunks(seq, g.cp, c, "zigzag") for c in range(g.cp)], self.comm))
        self.stage = cut_stage(self.full, g.p, g.pp)                   # 2. this rank's stage,
        self.shard_dims, vocab_lo = shard_layers(self.full, range(self.stage.lo, self.stage.hi),
                                                 g, self.comm)         # 1. cut for its TP group
        self.stage.loss = partial(vocab_parallel_loss, vocab_lo=vocab_lo, grid=g,
                                  counter=self.comm)
        self.model = self.stage.module
        self.optimizer = self.make_optimizer(self.model.parameters())  # the shards' parameters
        self.actions = SCHEDULES[self.schedule_name](g.pp, self.m, g.p)
        self.extra.update(grid=g.describe(), coords=list(g.coords), cp_rank=g.c)

    def local_batch(self, x, y):
        x, y = super().local_batch(x, y)   # this replica's rows
        return (x, y) if self.pos is None else (x[:, self.pos], y[:, self.pos])

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        return run_schedule(self.stage, self.actions, x.chunk(self.m), y.chunk(self.m),
                            self.grid, self.comm, self.meter)

    def after_backward(self) -> None:
        """3. Data parallelism: average every gradient over the replicas holding the same
        shard (with CP, over the DP x CP ranks: each saw its rows' share of the tokens)."""
        n = self.grid.dp * self.grid.cp
        if n == 1:
            return
        grads = [p.grad for p in self.model.parameters()]
        flat = flatten(grads)
        self.comm.record("all_reduce", flat,
                         sent_bytes=ring_sent_bytes("all_reduce", nbytes(flat), n))
        dist.all_reduce(flat, group=self.grid.dp_cp_group)
        unflatten_into(flat.div_(n), grads)

    def global_loss(self, local_loss):
        return pipeline_loss(local_loss, self.grid)

    def param_layout(self) -> ParamLayout:
        """This stage's tensors under the baseline's names, cut over the TP group; the DP x CP
        copies of a shard are equal, and replica 0's is read."""
        g = self.grid
        return ParamLayout(self.stage.named(self.full), split=self.shard_dims, tp=g.tp,
                           tp_rank=g.t, stages=g.pp, stage=g.p, replica=g.d * g.cp + g.c)

    def memory(self) -> dict:
        return self.stage.memory(self.optimizer, self.meter, self.rt.device)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.parallel3d", description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--cp", type=int, default=1,
                   help="context parallel degree: the sequence cut over CP ranks, ring attention "
                        "(zig-zag layout; default 1)")
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--order", default="tp-inner", choices=["tp-inner", "pp-inner"],
                   help="tp-inner: consecutive ranks (one node) form a TP group (default); "
                        "pp-inner: they hold consecutive stages, TP spans nodes")
    return add_common_args(p)


def grid_from_args(args) -> Grid:
    return Grid(dp=args.dp, pp=args.pp, tp=args.tp, order=args.order, cp=args.cp)


def check_args(args, settings, world: int) -> None:
    grid_from_args(args).validate(world, settings.model, settings.batch_size, args.microbatches,
                                  settings.preset)


def make_strategy(rt, settings, args) -> Strategy:
    return Parallel3D(rt, settings, grid_from_args(args), args.schedule, args.microbatches)


def main(argv=None) -> int:
    return run_lab(registry.get("parallel3d"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
