"""Pipeline parallelism: the model cut into P stages, micro-batches flowing through, GPipe and 1F1B.

Rank r holds stage r (contiguous layers from ``model.stages(P)``); activations go forward to r+1
and their gradients come back, by point-to-point messages. The batch is cut into M micro-batches
so that the stages work at once; their gradients add up before the one optimizer step (gradient
accumulation), so the run equals the baseline. A schedule is each rank's list of actions (F, B,
and W where the backward is split), run in order by :func:`run_schedule`: GPipe, 1F1B,
interleaved 1F1B, ZB-H1. The run records every rank's list and when each action worked;
dtlab/report/pipeline_schedule.py reads the bubble from that and draws schedule.png.
``--impl torch``: the same stages run by torch.distributed.pipelining's schedules
(labs/library/torch_pipeline.py). Explained in docs/pipeline.md.

Run:
    torchrun --nproc_per_node=2 -m labs.pipeline --schedule 1f1b --microbatches 4
    dtlab run pipeline --nproc 4 --preset small --schedule gpipe --microbatches 8 \\
        --stage-compute-ms 20
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.measure import memory_meter as mem
from dtlab.measure.comm_counter import CommCounter, nbytes
from dtlab.train.grid import Grid
from dtlab.train.layout import ParamLayout
from dtlab.train.loop import Strategy
from dtlab.train.model import ToyGPT, loss_fn, stage_bounds
from dtlab.train.settings import finite


# --------------------------------------------------------------------------- schedules

def gpipe_schedule(p: int, m: int, rank: int, v: int = 1) -> list[tuple[str, int]]:
    """Every forward, then every backward: all M micro-batches' activations alive at once."""
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b_schedule(p: int, m: int, rank: int, v: int = 1) -> list[tuple[str, int]]:
    """P-1-r warm-up forwards, then one forward one backward: GPipe's bubble, but at most P-r
    micro-batches alive on rank r, whatever M is."""
    warmup = min(p - 1 - rank, m)
    steady = [a for i in range(m - warmup) for a in (("F", warmup + i), ("B", i))]  # 1F, 1B
    return ([("F", i) for i in range(warmup)] + steady
            + [("B", i) for i in range(m - warmup, m)])  # cool-down: the last backwards


def interleaved_schedule(p: int, m: int, rank: int, v: int = 2) -> list[tuple[str, int, int]]:
    """Interleaved 1F1B (Megatron's virtual pipeline): rank r holds V chunks, chunk c being
    virtual stage c P + r. Micro-batches go through in groups of P: the k-th forward of a rank is
    micro-batch (k // PV) P + k % P on chunk (k // P) % V; backwards walk the chunks the other
    way. Warm-up: 2 (P - 1 - r) + (V - 1) P forwards, then one forward one backward."""
    n = m * v

    def at(k, down=False):  # micro-batch and chunk of the rank's k-th forward (or backward)
        c = (k // p) % v
        return (k // (p * v)) * p + k % p, v - 1 - c if down else c

    warmup = min(2 * (p - 1 - rank) + (v - 1) * p, n)
    actions = [("F", *at(k)) for k in range(warmup)]
    for k in range(warmup, n):
        actions += [("F", *at(k)), ("B", *at(k - warmup, down=True))]
    return actions + [("B", *at(k, down=True)) for k in range(n - warmup, n)]


def zbh1_schedule(p: int, m: int, rank: int, v: int = 1) -> list[tuple[str, int]]:
    """ZB-H1 (zero bubble, Qi et al. 2023): the backward split into B (the input's gradient,
    which the previous stage waits for) and W (the weights' gradient, which nobody waits for).
    1F1B's order of F and B, with rank r's W passes running r behind its B passes: the W's fill
    the cool-down, where 1F1B idles, and every rank keeps at most P micro-batches alive (1F1B's
    most, on rank 0)."""
    actions = []
    for kind, i in one_f_one_b_schedule(p, m, rank):
        actions.append((kind, i))
        if kind == "B" and i >= rank:  # W of micro-batch i - r right after B of i
            actions.append(("W", i - rank))
    return actions + [("W", i) for i in range(max(m - rank, 0), m)]  # then the last r W's


SCHEDULES = MappingProxyType({"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule,
                              "interleaved": interleaved_schedule, "zbh1": zbh1_schedule})
SPLIT_BACKWARD = frozenset({"zbh1"})   # schedules with separate B and W passes


# --------------------------------------------------------------------------- one stage

@dataclass
class Stage:
    """One rank's stage: layers ``full.layers[lo:hi]`` of the full model, and its loss (the last
    stage's; tensor-parallel stages use the vocabulary-parallel one)."""
    module: torch.nn.Module
    lo: int
    hi: int
    width: int                       # d_model: what travels between stages is [rows, seq, width]
    loss: Callable = loss_fn
    peak_live: int = 0               # most micro-batches alive at once, and their saved bytes
    peak_live_bytes: int = 0
    timelines: list = field(default_factory=list)  # a step each: (start, end) of every action

    def named(self, full: ToyGPT) -> dict[str, torch.nn.Parameter]:
        """This stage's parameters under the full model's names."""
        return {n: p for n, p in full.named_parameters()
                if self.lo <= int(n.split(".")[1]) < self.hi}

    def memory(self, optimizer, meter, device) -> dict:
        snap = mem.snapshot(list(self.module.parameters()), optimizer, meter, device)
        snap["activations_peak"] = self.peak_live_bytes  # all live micro-batches at once
        return snap


def cut_stage(full: ToyGPT, index: int, stages: int) -> Stage:
    """Stage ``index`` of ``stages``: it shares the full model's modules, so an optimizer over
    its parameters trains the full model's slice and the names map back to the baseline's."""
    lo, hi = stage_bounds(full.cfg.n_layer, stages)[index]
    return Stage(full.stages(stages)[index], lo, hi, full.cfg.d_model)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(min(1e-3, max(0.0, end - time.perf_counter())))


def _tag(boundary: int, i: int, m: int) -> int:
    """Micro-batch i's activations crossing from virtual stage ``boundary`` to the next (its
    gradients come back with tag + 1)."""
    return 2 * (boundary * m + i)


def run_schedule(stages: Stage | list[Stage], actions: list[tuple], xs, ys, grid: Grid,
                 comm: CommCounter, meter: mem.ActivationMeter, compute_s: float = 0.0,
                 split_backward: bool = False) -> torch.Tensor:
    """Run one rank's action list for one step; returns the summed micro-batch losses (the last
    stage's; zero elsewhere). ``stages``: this rank's chunk, or its V chunks (chunk c is virtual
    stage c P + p). With ``split_backward`` B computes only the input's gradient (what the
    previous stage waits for) and W the parameters', later. Receives block, sends do not
    (isend), so any schedule whose dependencies are acyclic runs without deadlock. The step's
    timeline (each action's work, from after its receive to its end) and the most live
    micro-batches (F done, activations not yet released) are kept on the first chunk."""
    stages = stages if isinstance(stages, list) else [stages]
    book, v, m, device = stages[0], len(stages), len(xs), xs[0].device
    prev, nxt = grid.stage_rank(grid.p - 1), grid.stage_rank(grid.p + 1)
    inputs, outputs, grads, live, sends, timeline = {}, {}, {}, {}, [], []
    total_loss = torch.zeros((), device=device)

    def send(t, to, tag):  # isend: the rank goes on while the message travels
        sends.append(dist.isend(t, to, tag=tag))
        comm.record("send", t, sent_bytes=nbytes(t))

    def recv(shape, src, tag):  # blocks until the neighbour's message arrives
        t = torch.empty(shape, device=device)
        dist.recv(t, src, tag=tag)
        return t

    for action in actions:
        kind, i, c = (*action, 0)[:3]
        stage, vs, key = stages[c], c * grid.pp + grid.p, (i, c)
        first, last = vs == 0, vs == grid.pp * v - 1
        if kind == "F":
            inp = xs[i] if first else recv((*xs[i].shape, stage.width), prev,
                                           _tag(vs - 1, i, m)).requires_grad_(True)
            t1 = time.time()  # waiting for the message is idle time, not work
            with meter.measure(stage.module.parameters()) as saved:
                out = stage.module(inp)
                if last:
                    out = stage.loss(out, ys[i]) / m  # mean of equal micro-batch means
            inputs[key], outputs[key], live[key] = inp, out, saved.last
            book.peak_live = max(book.peak_live, len(live))
            book.peak_live_bytes = max(book.peak_live_bytes, sum(live.values()))
            _busy(compute_s / v)
            if last:
                total_loss += out.detach()
            else:
                send(out.detach(), nxt, _tag(vs, i, m))
        elif kind == "B":
            out, inp = outputs[key], inputs[key]
            grad = None if last else recv(out.shape, nxt, _tag(vs, i, m) + 1)
            t1 = time.time()
            if split_backward:  # only the input's gradient now; keep the graph for W
                grads[key] = grad
                g_in = None if first else torch.autograd.grad(out, inp, grad,
                                                              retain_graph=True)[0]
            else:
                out.backward(grad)
                g_in = inp.grad
                del outputs[key], inputs[key], live[key]  # its activations are released
            _busy((1 if split_backward else 2) * compute_s / v)
            if not first:
                send(g_in, prev, _tag(vs - 1, i, m) + 1)
        elif kind == "W":  # the parameters' gradients of a B done earlier
            t1 = time.time()
            out, grad = outputs.pop(key), grads.pop(key)
            del inputs[key], live[key]
            params = [q for q in stage.module.parameters() if q.requires_grad]
            for q, g in zip(params, torch.autograd.grad(out, params, grad, allow_unused=True)):
                if g is not None:
                    q.grad = g if q.grad is None else q.grad + g
            _busy(compute_s / v)
        else:
            raise ValueError(f"unknown pipeline action {action!r}")
        timeline.append((t1, time.time()))
    for s in sends:
        s.wait()
    book.timelines.append(timeline)
    return total_loss


def pipeline_loss(local_loss: torch.Tensor, grid: Grid) -> float:
    """Only the last stage knows the loss (every TP rank of it the same value): each replica's
    last stage at TP index 0 contributes, the sum over replicas divided by DP is the global
    batch's loss (with CP, every CP rank's mean over its equal share of the tokens: divided by
    DP x CP). Bookkeeping for the record, not counted as traffic."""
    keep = grid.next_rank is None and grid.t == 0
    t = local_loss.detach().clone() if keep else torch.zeros((), device=local_loss.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.item() / (grid.dp * grid.cp)


# --------------------------------------------------------------------------- the strategies

class Pipeline(Strategy):
    """This rank's chunks of the model (its stage, or V chunks round-robin), their optimizer,
    where they sit in the whole model; OwnPipeline runs our schedules on them."""
    name = "pipeline"
    impl = "own"
    whole_batch = True  # every stage sees the whole batch (the first its tokens, the last its
                        # targets)

    def __init__(self, rt, settings, schedule: str, microbatches: int, virtual: int = 1,
                 compute_ms: float = 0.0):
        super().__init__(rt, settings)
        self.schedule_name, self.m, self.v = schedule, microbatches, virtual
        self.compute_s = compute_ms / 1e3  # --stage-compute-ms, for our schedules
        self.variant = f"{self.impl}-{schedule}" + (f"-v{virtual}" if virtual > 1 else "")
        self.grid = Grid(pp=rt.world_size, rank=rt.rank)

    def build(self) -> None:
        p, r, v = self.grid.pp, self.grid.p, self.v
        self.full = ToyGPT(self.settings.model).to(self.rt.device)  # same init as the baseline
        # chunk c of this rank is virtual stage c P + r of P V (round-robin); one chunk: stage r
        self.chunks = [cut_stage(self.full, c * p + r, p * v) for c in range(v)]
        self.stage = self.chunks[0]
        self.model = torch.nn.ModuleList([st.module for st in self.chunks])
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.extra.update(stages=p, microbatches=self.m, schedule=self.schedule_name,
                          virtual_stages=v,
                          stage_layers=[[st.lo, st.hi] for st in self.chunks] if v > 1 else
                          [self.stage.lo, self.stage.hi])

    def param_layout(self) -> ParamLayout:
        # Interleaved ranks hold several chunks: a stage index only has to be one per rank.
        named = {n: q for st in self.chunks for n, q in st.named(self.full).items()}
        return ParamLayout(named, stages=self.grid.pp, stage=self.grid.p)

    def global_loss(self, local_loss: torch.Tensor) -> float:
        return pipeline_loss(local_loss, self.grid)


class OwnPipeline(Pipeline):
    """Our action lists (``SCHEDULES``), run by :func:`run_schedule`."""

    def build(self) -> None:
        super().build()
        lists = [SCHEDULES[self.schedule_name](self.grid.pp, self.m, r, self.v)
                 for r in range(self.grid.pp)]
        self.actions = lists[self.grid.p]
        self.extra["actions"] = lists  # every rank's, so the report can replay the schedule

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        self.barrier()  # every stage starts the step together: the timeline measures the step
        return run_schedule(self.chunks, self.actions, x.chunk(self.m), y.chunk(self.m),
                            self.grid, self.comm, self.meter, self.compute_s,
                            split_backward=self.schedule_name in SPLIT_BACKWARD)

    def memory(self) -> dict:
        snap = super().memory()
        snap["activations_peak"] = self.stage.peak_live_bytes  # all live micro-batches at once
        return snap

    def close(self) -> None:
        # Every rank's timelines (time.time(): one clock for the ranks of a machine) and live
        # micro-batches into the record.
        per_rank = self.gather_object((self.stage.timelines, self.stage.peak_live,
                                       self.stage.peak_live_bytes))
        if self.rt.is_main:
            timelines, live, live_bytes = (list(x) for x in zip(*per_rank))
            self.extra.update(timelines=timelines, peak_live_microbatches=live,
                              peak_live_activation_bytes=live_bytes)
        super().close()


# --------------------------------------------------------------------------- command line

def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own",
                   choices=["own", *dict(registry.get("pipeline").library)])
    p.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
    p.add_argument("--microbatches", type=int, default=4, help="M (default 4)")
    p.add_argument("--virtual-stages", type=int, default=None,
                   help="V model chunks per rank for --schedule interleaved (default 2)")
    p.add_argument("--stage-compute-ms", type=finite, default=0.0,
                   help="known busy time added to every forward (and twice to every backward)")
    return add_common_args(p)


def virtual_stages(args) -> int:
    return args.virtual_stages or (2 if args.schedule == "interleaved" else 1)


def check_args(args, settings, world: int) -> None:
    v = virtual_stages(args)
    if args.schedule != "interleaved" and v != 1:
        raise UsageError(f"--virtual-stages {v}: only --schedule interleaved runs several "
                         "chunks per rank")
    if args.schedule == "interleaved":
        if v < 2:
            raise UsageError(f"--virtual-stages {v}: interleaving needs 2 or more chunks a rank")
        if world * v > settings.model.n_layer:
            raise UsageError(f"--schedule interleaved: {world} ranks x {v} chunks = "
                             f"{world * v} virtual stages but preset {settings.preset!r} has "
                             f"{settings.model.n_layer} blocks; use fewer --virtual-stages or "
                             "ranks, or a preset with more layers")
        if args.microbatches % world:
            raise UsageError(f"--schedule interleaved sends micro-batches in groups of the "
                             f"{world} stages: --microbatches {args.microbatches} must be a "
                             f"multiple of {world}")
    Grid(pp=world).validate(world, settings.model, settings.batch_size, args.microbatches,
                            settings.preset)
    if not args.stage_compute_ms >= 0:  # also refuses nan
        raise UsageError(f"--stage-compute-ms must be >= 0, got {args.stage_compute_ms}")
    if args.impl != "own" and args.stage_compute_ms:
        raise UsageError(f"--stage-compute-ms belongs to --impl own (--impl {args.impl}'s "
                         "schedules run their own steps)")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl != "own":
        return registry.get("pipeline").library_strategy(args.impl)(
            rt, settings, args.schedule, args.microbatches, virtual_stages(args))
    return OwnPipeline(rt, settings, args.schedule, args.microbatches, virtual_stages(args),
                       args.stage_compute_ms)


def main(argv=None) -> int:
    return run_lab(registry.get("pipeline"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
