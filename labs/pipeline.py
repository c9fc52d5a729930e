"""Pipeline parallelism: the model cut into P stages, micro-batches flowing through, GPipe and 1F1B.

Rank r holds stage r (contiguous layers from ``model.stages(P)``); activations go forward to r+1
and their gradients come back from r+1 by point-to-point messages. One stage alone would leave
P-1 devices idle, so the batch is cut into M micro-batches: while stage 1 works on micro-batch 0,
stage 0 starts micro-batch 1. Gradients of the micro-batches add up before the one optimizer step
(gradient accumulation), so the run equals the baseline.

A schedule is a list of actions per rank, ``("F", m)`` or ``("B", m)``, executed in order by
:func:`run_schedule`:
- GPipe: every forward, then every backward. Simple; holds the activations of all M micro-batches.
- 1F1B: rank r does P-1-r warm-up forwards, then alternates one forward and one backward, then
  drains the remaining backwards. Same bubble as GPipe, but at most P-r micro-batches are alive on
  rank r: activation memory no longer grows with M.
Both leave each stage idle for (P-1) slots out of (M+P-1): the bubble (P-1)/(M+P-1).

Every rank records a timeline of its actions. ``--stage-compute-ms X`` adds a known busy time to
every forward (X) and backward (2X), a stand-in for a big stage's compute, so that the schedule's
shape dominates and the measured bubble can be set against the theory on a small CPU; the lab
writes ``schedule.png`` (one row per rank) into its run folder.

``--impl torch`` runs the same stages with ``torch.distributed.pipelining`` (PipelineStage,
ScheduleGPipe, Schedule1F1B). labs/parallel3d.py reuses ``run_schedule`` inside each replica.

Explained in docs/pipeline.md (questions 4, 11 and 24-26 of docs/questions.md).

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
from dtlab.core import checkpoint as ckpt
from dtlab.core import memory as mem
from dtlab.core.comm import CommCounter, library_collectives, nbytes
from dtlab.core.grid import Grid
from dtlab.core.model import ToyGPT, loss_fn, stage_bounds
from dtlab.core.settings import finite
from dtlab.core.train import Strategy, UsageError, add_common_args, run_lab


# --------------------------------------------------------------------------- schedules

def gpipe_schedule(p: int, m: int, rank: int) -> list[tuple[str, int]]:
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b_schedule(p: int, m: int, rank: int) -> list[tuple[str, int]]:
    warmup = min(p - 1 - rank, m)
    actions = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while f < m:               # steady state: one forward, one backward
        actions.append(("F", f))
        f += 1
        actions.append(("B", b))
        b += 1
    actions += [("B", i) for i in range(b, m)]  # cool-down
    return actions


SCHEDULES = MappingProxyType({"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule})


def bubble_theory(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


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
    timelines: list = field(default_factory=list)

    def named(self, full: ToyGPT) -> dict[str, torch.nn.Parameter]:
        """This stage's parameters under the full model's names."""
        return {n: p for n, p in full.named_parameters()
                if self.lo <= int(n.split(".")[1]) < self.hi}

    def params(self, full: ToyGPT) -> dict[str, torch.Tensor]:
        """The same as CPU copies."""
        return {n: p.detach().cpu() for n, p in self.named(full).items()}

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


def run_schedule(stage: Stage, actions: list[tuple[str, int]], xs, ys, grid: Grid,
                 comm: CommCounter, meter: mem.ActivationMeter,
                 compute_s: float = 0.0) -> torch.Tensor:
    """Execute one rank's action list for one step; returns the summed micro-batch losses (the
    last stage's; zero elsewhere). Receives block until the neighbour's message arrives, sends
    do not (isend), so any schedule whose dependencies are acyclic runs without deadlock. The
    step's timeline (kind, micro-batch, work start, end, start of waiting) is appended to
    ``stage.timelines``."""
    m, device = len(xs), xs[0].device
    first, last = grid.prev_rank is None, grid.next_rank is None
    inputs, outputs, live, live_bytes, sends = {}, {}, {}, 0, []
    total_loss = torch.zeros((), device=device)
    timeline = []
    for kind, i in actions:
        t0 = time.time()
        if kind == "F":
            if first:
                inp = xs[i]
            else:
                inp = torch.empty(xs[i].shape[0], xs[i].shape[1], stage.width, device=device)
                dist.recv(inp, grid.prev_rank, tag=2 * i)
                inp.requires_grad_(True)
            t1 = time.time()  # waiting for the message is idle time, not work
            with meter.measure(stage.module.parameters()) as saved:
                out = stage.module(inp)
                if last:
                    out = stage.loss(out, ys[i]) / m  # mean of equal micro-batch means
            live[i] = saved.last
            live_bytes += saved.last
            stage.peak_live = max(stage.peak_live, len(live))
            stage.peak_live_bytes = max(stage.peak_live_bytes, live_bytes)
            inputs[i], outputs[i] = inp, out
            _busy(compute_s)
            if last:
                total_loss += out.detach()
            else:
                sends.append(dist.isend(out.detach(), grid.next_rank, tag=2 * i))
                comm.record("send", out, sent_bytes=nbytes(out))
        else:
            out = outputs.pop(i)
            if last:
                t1 = time.time()
                out.backward()
            else:
                grad = torch.empty_like(out)
                dist.recv(grad, grid.next_rank, tag=2 * i + 1)
                t1 = time.time()
                out.backward(grad)
            inp = inputs.pop(i)
            _busy(2 * compute_s)
            if not first:
                sends.append(dist.isend(inp.grad, grid.prev_rank, tag=2 * i + 1))
                comm.record("send", inp.grad, sent_bytes=nbytes(inp.grad))
            live_bytes -= live.pop(i)
        timeline.append((kind, i, t1, time.time(), t0))
    for s in sends:
        s.wait()
    stage.timelines.append(timeline)
    return total_loss


def stage_canonical(stage: Stage, full: ToyGPT, optimizer, gather) -> dict:
    """The canonical state (dtlab/core/checkpoint.py) of a pipeline: every stage's parameters
    and moments, put together on every rank."""
    return {k: v for part in gather(ckpt.adam_named(stage.named(full), optimizer))
            for k, v in part.items()}


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

class OwnPipeline(Strategy):
    name = "pipeline"
    whole_batch = True  # every stage sees the whole batch (the first needs the tokens, the last
                        # the targets)

    def __init__(self, rt, settings, schedule: str, microbatches: int, compute_ms: float):
        super().__init__(rt, settings)
        self.schedule_name, self.m, self.compute_s = schedule, microbatches, compute_ms / 1e3
        self.variant = f"own-{schedule}"
        self.grid = Grid(pp=rt.world_size, rank=rt.rank)

    def build(self) -> None:
        p, r = self.grid.pp, self.grid.p
        self.full = ToyGPT(self.settings.model).to(self.rt.device)  # same init as the baseline
        self.stage = cut_stage(self.full, r, p)
        self.model = self.stage.module
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.actions = SCHEDULES[self.schedule_name](p, self.m, r)
        self.extra.update(stages=p, microbatches=self.m, schedule=self.schedule_name,
                          stage_layers=[self.stage.lo, self.stage.hi],
                          actions=[f"{a}{i}" for a, i in self.actions])

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        self.barrier()  # every stage starts the step together: the timeline measures the step
        return run_schedule(self.stage, self.actions, x.chunk(self.m), y.chunk(self.m),
                            self.grid, self.comm, self.meter, self.compute_s)

    def global_loss(self, local_loss: torch.Tensor) -> float:
        return pipeline_loss(local_loss, self.grid)

    def full_state(self):
        parts = self.gather_object(self.stage.params(self.full))
        return {k: v for part in parts for k, v in part.items()} if self.rt.is_main else None

    def memory(self) -> dict:
        return self.stage.memory(self.optimizer, self.meter, self.rt.device)

    def canonical_state(self) -> dict:
        return stage_canonical(self.stage, self.full, self.optimizer, self.gather_object)

    def load_canonical_state(self, full: dict) -> None:
        ckpt.load_adam_named(self.stage.named(self.full), self.optimizer, full)

    def close(self) -> None:
        # The first step includes warm-up (allocations, connections); measure the later ones.
        steps = self.stage.timelines[1:] or self.stage.timelines
        per_rank = self.gather_object({"timelines": steps, "peak_live": self.stage.peak_live,
                                       "peak_live_bytes": self.stage.peak_live_bytes})
        if self.rt.is_main:
            self.extra.update(analyse(per_rank, self.rt.world_size, self.m))
            draw_schedule(per_rank, self.settings.out, self.variant, self.extra)
        super().close()


class TorchPipeline(Strategy):
    """The same stages through torch.distributed.pipelining's own schedules."""

    name = "pipeline"
    whole_batch = True

    def __init__(self, rt, settings, schedule: str, microbatches: int):
        super().__init__(rt, settings)
        self.schedule_name, self.m = schedule, microbatches
        self.variant = f"torch-{schedule}"

    def build(self) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        r, p = self.rt.rank, self.rt.world_size
        self.full = ToyGPT(self.settings.model).to(self.rt.device)
        self.stage = cut_stage(self.full, r, p)
        self.model = self.stage.module
        self.optimizer = self.make_optimizer(self.model.parameters())
        torch_stage = PipelineStage(self.model, r, p, self.rt.device)
        cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        # loss per micro-batch; the schedule divides the gradients by M (scale_grads)
        self.sched = cls(torch_stage, n_microbatches=self.m, loss_fn=loss_fn)

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        r, last = self.rt.rank, self.rt.rank == self.rt.world_size - 1
        losses: list[torch.Tensor] = []
        # Saved tensors of the whole step: an upper bound on the live activations here, since
        # torch's schedule frees each micro-batch's after its backward.
        with self.meter.measure(self.model.parameters()), library_collectives(self.comm):
            if r == 0:
                self.sched.step(x)
            elif last:
                self.sched.step(target=y, losses=losses)
            else:
                self.sched.step()
        if last:
            return torch.stack(losses).mean().detach()
        return torch.zeros((), device=self.rt.device)

    def global_loss(self, local_loss: torch.Tensor) -> float:
        return pipeline_loss(local_loss, Grid(pp=self.rt.world_size, rank=self.rt.rank))

    def full_state(self):
        parts = self.gather_object(self.stage.params(self.full))
        return {k: v for part in parts for k, v in part.items()} if self.rt.is_main else None

    def canonical_state(self) -> dict:
        return stage_canonical(self.stage, self.full, self.optimizer, self.gather_object)

    def load_canonical_state(self, full: dict) -> None:
        ckpt.load_adam_named(self.stage.named(self.full), self.optimizer, full)


# --------------------------------------------------------------------------- measured vs theory

def analyse(per_rank: list[dict], p: int, m: int) -> dict:
    """Measured bubble: per step, the span from the first action's start to the last action's
    end over all ranks; each rank is busy for the sum of its actions; bubble = 1 - mean busy /
    span. Averaged over steps."""
    bubbles = []
    for s in range(len(per_rank[0]["timelines"])):
        tls = [pr["timelines"][s] for pr in per_rank]
        start = min(a[2] for tl in tls for a in tl)
        end = max(a[3] for tl in tls for a in tl)
        busy = [sum(a[3] - a[2] for a in tl) for tl in tls]
        bubbles.append(1 - sum(busy) / len(busy) / (end - start))
    return {"bubble_measured": sum(bubbles) / len(bubbles), "bubble_theory": bubble_theory(p, m),
            "peak_live_microbatches": [pr["peak_live"] for pr in per_rank],
            "peak_live_activation_bytes": [pr["peak_live_bytes"] for pr in per_rank]}


def draw_schedule(per_rank: list[dict], out: str, title: str, figures: dict) -> None:
    """schedule.png: one row per stage, forwards blue, backwards green, gaps the bubble."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from pathlib import Path
    tls = [pr["timelines"][-1] for pr in per_rank]
    t0 = min(a[2] for tl in tls for a in tl)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(tls) + 1.2))
    for r, tl in enumerate(tls):
        for kind, i, s, e, _ in tl:
            ax.barh(r, (e - s) * 1e3, left=(s - t0) * 1e3, height=0.8,
                    color="#4c78a8" if kind == "F" else "#59a14f", edgecolor="white")
            ax.text((s - t0 + (e - s) / 2) * 1e3, r, f"{kind}{i}", ha="center", va="center",
                    color="white", fontsize=7)
    ax.set_yticks(range(len(tls)), [f"stage {r}" for r in range(len(tls))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (white gaps are the bubble)")
    ax.set_title(f"{title}: measured bubble {figures['bubble_measured']:.3f}, theory "
                 f"(P-1)/(M+P-1) = {figures['bubble_theory']:.3f}")
    fig.tight_layout()
    Path(out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out) / "schedule.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", "torch"])
    p.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
    p.add_argument("--microbatches", type=int, default=4, help="M (default 4)")
    p.add_argument("--stage-compute-ms", type=finite, default=0.0,
                   help="known busy time added to every forward (and twice to every backward)")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    Grid(pp=world).validate(world, settings.model, settings.batch_size, args.microbatches,
                            settings.preset)
    if not args.stage_compute_ms >= 0:  # also refuses nan
        raise UsageError(f"--stage-compute-ms must be >= 0, got {args.stage_compute_ms}")
    if args.impl == "torch" and args.stage_compute_ms:
        raise UsageError("--stage-compute-ms belongs to --impl own (torch's schedules run "
                         "their own steps)")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl == "torch":
        return TorchPipeline(rt, settings, args.schedule, args.microbatches)
    return OwnPipeline(rt, settings, args.schedule, args.microbatches, args.stage_compute_ms)


def main(argv=None) -> int:
    return run_lab(registry.get("pipeline"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
