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
from dtlab.reliability import checkpoint as ckpt
from dtlab.measure import memory_meter as mem
from dtlab.measure.comm_counter import CommCounter, library_collectives, nbytes
from dtlab.costmodel.shapes import bubble as bubble_theory
from dtlab.train.grid import Grid
from dtlab.train.model import ToyGPT, loss_fn, stage_bounds
from dtlab.train.settings import finite
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


# --------------------------------------------------------------------------- schedules

def gpipe_schedule(p: int, m: int, rank: int, v: int = 1) -> list[tuple[str, int]]:
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b_schedule(p: int, m: int, rank: int, v: int = 1) -> list[tuple[str, int]]:
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


def interleaved_schedule(p: int, m: int, rank: int, v: int = 2) -> list[tuple[str, int, int]]:
    """Interleaved 1F1B (Megatron's virtual pipeline): rank r holds V chunks, chunk c being
    virtual stage c P + r. Micro-batches go through in groups of P: the k-th forward of a rank is
    micro-batch (k // PV) P + k % P on chunk (k // P) % V; backwards walk the chunks the other
    way. Warm-up: 2 (P - 1 - r) + (V - 1) P forwards, then one forward one backward."""
    n = m * v

    def forward(k):
        return (k // (p * v)) * p + k % p, (k // p) % v

    def backward(k):
        return (k // (p * v)) * p + k % p, v - 1 - (k // p) % v

    warmup = min(2 * (p - 1 - rank) + (v - 1) * p, n)
    actions = [("F", *forward(k)) for k in range(warmup)]
    for k in range(warmup, n):
        actions += [("F", *forward(k)), ("B", *backward(k - warmup))]
    actions += [("B", *backward(k)) for k in range(n - warmup, n)]
    return actions


def zbh1_schedule(p: int, m: int, rank: int, v: int = 1) -> list[tuple[str, int]]:
    """ZB-H1 (zero bubble, Qi et al. 2023): the backward split into B (the input's gradient,
    which the previous stage waits for) and W (the weights' gradient, which nobody waits for).
    1F1B's order of F and B, with rank r's W passes running r behind its B passes: the W's fill
    the cool-down, where 1F1B idles, and every rank keeps at most P micro-batches alive (1F1B's
    most, on rank 0)."""
    warmup = min(p - 1 - rank, m)
    actions = [("F", i) for i in range(warmup)]
    f, b, w = warmup, 0, 0
    while b < m:
        if f < m:
            actions.append(("F", f))
            f += 1
        actions.append(("B", b))
        b += 1
        if b - w > rank:
            actions.append(("W", w))
            w += 1
    return actions + [("W", i) for i in range(w, m)]


SCHEDULES = MappingProxyType({"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule,
                              "interleaved": interleaved_schedule, "zbh1": zbh1_schedule})
SPLIT_BACKWARD = frozenset({"zbh1"})   # schedules with separate B and W passes


def ideal(p: int, m: int, schedule: str, v: int = 1) -> dict:
    """Replay every rank's action list with unit costs (F 1/V, B 2/V, or B = W = 1/V when split)
    and free messages: the bubble and the most live micro-batches per rank (activations are
    released by B, or by W when the backward is split). Raises if the lists deadlock."""
    lists = [SCHEDULES[schedule](p, m, r, v) for r in range(p)]
    split = schedule in SPLIT_BACKWARD
    cost = {"F": 1 / v, "B": (1 if split else 2) / v, "W": 1 / v}
    done, pos, clock = {}, [0] * p, [0.0] * p
    moved = True
    while moved:
        moved = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                kind, i, c = (*lists[r][pos[r]], 0)[:3]
                vs = c * p + r
                need = {"F": [("F", i, vs - 1)] if vs else [],
                        "B": [("F", i, vs)] + ([("B", i, vs + 1)] if vs < p * v - 1 else []),
                        "W": [("B", i, vs)]}[kind]
                if any(n not in done for n in need):
                    break
                clock[r] = max([clock[r]] + [done[n] for n in need]) + cost[kind]
                done[(kind, i, vs)] = clock[r]
                pos[r] += 1
                moved = True
    if pos != [len(x) for x in lists]:
        raise RuntimeError(f"schedule {schedule} deadlocks at P={p}, M={m}, V={v}")
    busy = sum(cost[(*a, 0)[0]] for x in lists for a in x) / p
    release = "W" if split else "B"
    peaks = []
    for x in lists:
        alive = peak = 0
        for a in x:
            alive += 1 if a[0] == "F" else -1 if a[0] == release else 0
            peak = max(peak, alive)
        peaks.append(peak)
    return {"bubble": 1 - busy / max(clock), "peak_live": peaks}


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


def _tag(boundary: int, i: int, m: int) -> int:
    """Message tag of micro-batch i crossing from virtual stage ``boundary`` to the next
    (activations; their gradients go back with tag + 1)."""
    return 2 * (boundary * m + i)


def run_schedule(stages: Stage | list[Stage], actions: list[tuple], xs, ys, grid: Grid,
                 comm: CommCounter, meter: mem.ActivationMeter, compute_s: float = 0.0,
                 split_backward: bool = False) -> torch.Tensor:
    """Execute one rank's action list for one step; returns the summed micro-batch losses (the
    last stage's; zero elsewhere). ``stages``: this rank's model chunk, or its V chunks (chunk c
    is virtual stage c * P + p). An action is (kind, micro-batch) or (kind, micro-batch, chunk);
    kinds F, B and, with ``split_backward``, W: B then computes only the gradient of the stage's
    input (what the previous stage waits for) and W the parameters' gradients, later. Receives
    block until the neighbour's message arrives, sends do not (isend), so any schedule whose
    dependencies are acyclic runs without deadlock. The step's timeline (kind, micro-batch, work
    start, end, start of waiting, chunk) and the most live micro-batches (F done, activations
    not yet released) are kept on the first chunk."""
    stages = stages if isinstance(stages, list) else [stages]
    book, v, m, device = stages[0], len(stages), len(xs), xs[0].device
    n_virtual = grid.pp * v
    prev, nxt = grid.stage_rank(grid.p - 1), grid.stage_rank(grid.p + 1)
    inputs, outputs, grads, live, live_bytes, sends = {}, {}, {}, {}, 0, []
    total_loss = torch.zeros((), device=device)
    timeline = []
    for action in actions:
        kind, i, c = (*action, 0)[:3]
        stage, vs = stages[c], c * grid.pp + grid.p
        first, last = vs == 0, vs == n_virtual - 1
        t0 = time.time()
        if kind == "F":
            if first:
                inp = xs[i]
            else:
                inp = torch.empty(xs[i].shape[0], xs[i].shape[1], stage.width, device=device)
                dist.recv(inp, prev, tag=_tag(vs - 1, i, m))
                inp.requires_grad_(True)
            t1 = time.time()  # waiting for the message is idle time, not work
            with meter.measure(stage.module.parameters()) as saved:
                out = stage.module(inp)
                if last:
                    out = stage.loss(out, ys[i]) / m  # mean of equal micro-batch means
            live[(i, c)] = saved.last
            live_bytes += saved.last
            book.peak_live = max(book.peak_live, len(live))
            book.peak_live_bytes = max(book.peak_live_bytes, live_bytes)
            inputs[(i, c)], outputs[(i, c)] = inp, out
            _busy(compute_s / v)
            if last:
                total_loss += out.detach()
            else:
                sends.append(dist.isend(out.detach(), nxt, tag=_tag(vs, i, m)))
                comm.record("send", out, sent_bytes=nbytes(out))
        elif kind == "B":
            out, inp = outputs[(i, c)], inputs[(i, c)]
            grad = None
            if not last:
                grad = torch.empty_like(out)
                dist.recv(grad, nxt, tag=_tag(vs, i, m) + 1)
            t1 = time.time()
            if split_backward:  # only the input's gradient now; keep the graph for W
                grads[(i, c)] = grad
                g_in = None if first else torch.autograd.grad(out, inp, grad,
                                                              retain_graph=True)[0]
                _busy(compute_s / v)
            else:
                out.backward(grad)
                g_in = inp.grad
                _busy(2 * compute_s / v)
                del outputs[(i, c)], inputs[(i, c)]
                live_bytes -= live.pop((i, c))
            if not first:
                sends.append(dist.isend(g_in, prev, tag=_tag(vs - 1, i, m) + 1))
                comm.record("send", g_in, sent_bytes=nbytes(g_in))
        elif kind == "W":  # the parameters' gradients of a B done earlier
            t1 = time.time()
            out, grad = outputs.pop((i, c)), grads.pop((i, c))
            del inputs[(i, c)]
            params = [q for q in stage.module.parameters() if q.requires_grad]
            for q, g in zip(params, torch.autograd.grad(out, params, grad, allow_unused=True)):
                if g is not None:
                    q.grad = g if q.grad is None else q.grad + g
            _busy(compute_s / v)
            live_bytes -= live.pop((i, c))
        else:
            raise ValueError(f"unknown pipeline action {action!r}")
        timeline.append((kind, i, t1, time.time(), t0, c))
    for s in sends:
        s.wait()
    book.timelines.append(timeline)
    return total_loss


def chunks_named(stages: Stage | list[Stage], full: ToyGPT) -> dict:
    """The parameters of a rank's chunk(s) under the full model's names."""
    stages = stages if isinstance(stages, list) else [stages]
    return {k: v for st in stages for k, v in st.named(full).items()}


def stage_canonical(stages: Stage | list[Stage], full: ToyGPT, optimizer, gather) -> dict:
    """The canonical state (dtlab/reliability/checkpoint.py) of a pipeline: every stage's parameters
    and moments, put together on every rank."""
    return {k: v for part in gather(ckpt.adam_named(chunks_named(stages, full), optimizer))
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

    def __init__(self, rt, settings, schedule: str, microbatches: int, compute_ms: float,
                 virtual: int = 1):
        super().__init__(rt, settings)
        self.schedule_name, self.m, self.compute_s = schedule, microbatches, compute_ms / 1e3
        self.v = virtual
        self.variant = f"own-{schedule}" + (f"-v{virtual}" if virtual > 1 else "")
        self.grid = Grid(pp=rt.world_size, rank=rt.rank)

    def build(self) -> None:
        p, r, v = self.grid.pp, self.grid.p, self.v
        self.full = ToyGPT(self.settings.model).to(self.rt.device)  # same init as the baseline
        # chunk c of this rank is virtual stage c P + r of P V (round-robin); one chunk: stage r
        self.chunks = [cut_stage(self.full, c * p + r, p * v) for c in range(v)]
        self.stage = self.chunks[0]
        self.model = torch.nn.ModuleList([st.module for st in self.chunks])
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.actions = SCHEDULES[self.schedule_name](p, self.m, r, v)
        self.extra.update(stages=p, microbatches=self.m, schedule=self.schedule_name,
                          virtual_stages=v,
                          stage_layers=[[st.lo, st.hi] for st in self.chunks] if v > 1 else
                          [self.stage.lo, self.stage.hi],
                          actions=["".join(map(str, a)) for a in self.actions])

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        self.barrier()  # every stage starts the step together: the timeline measures the step
        return run_schedule(self.chunks, self.actions, x.chunk(self.m), y.chunk(self.m),
                            self.grid, self.comm, self.meter, self.compute_s,
                            split_backward=self.schedule_name in SPLIT_BACKWARD)

    def global_loss(self, local_loss: torch.Tensor) -> float:
        return pipeline_loss(local_loss, self.grid)

    def full_state(self):
        mine = {n: q.detach().cpu() for n, q in chunks_named(self.chunks, self.full).items()}
        parts = self.gather_object(mine)
        return {k: v for part in parts for k, v in part.items()} if self.rt.is_main else None

    def memory(self) -> dict:
        snap = mem.snapshot(list(self.model.parameters()), self.optimizer, self.meter,
                            self.rt.device)
        snap["activations_peak"] = self.stage.peak_live_bytes  # all live micro-batches at once
        return snap

    def canonical_state(self) -> dict:
        return stage_canonical(self.chunks, self.full, self.optimizer, self.gather_object)

    def load_canonical_state(self, full: dict) -> None:
        ckpt.load_adam_named(chunks_named(self.chunks, self.full), self.optimizer, full)

    def close(self) -> None:
        # The first step includes warm-up (allocations, connections); measure the later ones.
        steps = self.stage.timelines[1:] or self.stage.timelines
        per_rank = self.gather_object({"timelines": steps, "peak_live": self.stage.peak_live,
                                       "peak_live_bytes": self.stage.peak_live_bytes})
        if self.rt.is_main:
            self.extra.update(analyse(per_rank, self.rt.world_size, self.m, self.schedule_name,
                                      self.v))
            draw_schedule(per_rank, self.settings.out, self.variant, self.extra)
        super().close()


class TorchPipeline(Strategy):
    name = "pipeline"
    whole_batch = True

    # our schedule -> torch.distributed.pipelining's class (interleaved: V stages a rank)
    TORCH = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
             "interleaved": "ScheduleInterleaved1F1B", "zbh1": "ScheduleInterleavedZeroBubble"}

    def __init__(self, rt, settings, schedule: str, microbatches: int, virtual: int = 1):
        super().__init__(rt, settings)
        self.schedule_name, self.m, self.v = schedule, microbatches, virtual
        self.variant = f"torch-{schedule}" + (f"-v{virtual}" if virtual > 1 else "")

    def build(self) -> None:
        import torch.distributed.pipelining as pipelining
        from torch.distributed.pipelining import PipelineStage
        r, p, v = self.rt.rank, self.rt.world_size, self.v
        self.full = ToyGPT(self.settings.model).to(self.rt.device)
        self.chunks = [cut_stage(self.full, c * p + r, p * v) for c in range(v)]
        self.stage = self.chunks[0]
        self.model = torch.nn.ModuleList([st.module for st in self.chunks])
        self.optimizer = self.make_optimizer(self.model.parameters())
        stages = [PipelineStage(st.module, c * p + r, p * v, self.rt.device)
                  for c, st in enumerate(self.chunks)]
        cls = getattr(pipelining, self.TORCH[self.schedule_name])
        # loss per micro-batch; the schedule divides the gradients by M (scale_grads)
        self.sched = cls(stages if v > 1 or self.schedule_name in ("interleaved", "zbh1")
                         else stages[0], n_microbatches=self.m, loss_fn=loss_fn)
        self.extra.update(torch_schedule=self.TORCH[self.schedule_name], virtual_stages=v)

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
        mine = {n: q.detach().cpu() for n, q in chunks_named(self.chunks, self.full).items()}
        parts = self.gather_object(mine)
        return {k: v for part in parts for k, v in part.items()} if self.rt.is_main else None

    def canonical_state(self) -> dict:
        return stage_canonical(self.chunks, self.full, self.optimizer, self.gather_object)

    def load_canonical_state(self, full: dict) -> None:
        ckpt.load_adam_named(chunks_named(self.chunks, self.full), self.optimizer, full)


# --------------------------------------------------------------------------- measured vs theory

def analyse(per_rank: list[dict], p: int, m: int, schedule: str = "1f1b", v: int = 1) -> dict:
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
    best = ideal(p, m, schedule, v)
    return {"bubble_measured": sum(bubbles) / len(bubbles),
            "bubble_theory": bubble_theory(p, m, schedule, v), "bubble_ideal": best["bubble"],
            "peak_live_theory": best["peak_live"],
            "peak_live_microbatches": [pr["peak_live"] for pr in per_rank],
            "peak_live_activation_bytes": [pr["peak_live_bytes"] for pr in per_rank]}


def draw_schedule(per_rank: list[dict], out: str, title: str, figures: dict) -> None:
    """schedule.png: one row per stage, forwards blue, backwards green (B of a split backward
    green, W orange), each labelled with its micro-batch (and chunk, interleaved); gaps are the
    bubble."""
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
        for kind, i, s, e, *rest in tl:
            chunk = rest[1] if len(rest) > 1 else 0
            ax.barh(r, (e - s) * 1e3, left=(s - t0) * 1e3, height=0.8,
                    color={"F": "#4c78a8", "B": "#59a14f", "W": "#f28e2b"}[kind],
                    alpha=1.0 if chunk % 2 == 0 else 0.65, edgecolor="white")
            label = f"{kind}{i}" + ("'" * chunk)
            ax.text((s - t0 + (e - s) / 2) * 1e3, r, label, ha="center", va="center",
                    color="white", fontsize=7)
    ax.set_yticks(range(len(tls)), [f"stage {r}" for r in range(len(tls))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (white gaps are the bubble)")
    formula = {"interleaved": "(P-1)/(VM+P-1)", "zbh1": "(P-1)/(3M+P-1)"}.get(
        figures.get("schedule", ""), "(P-1)/(M+P-1)")
    ax.set_title(f"{title}: measured bubble {figures['bubble_measured']:.3f}, theory "
                 f"{formula} = {figures['bubble_theory']:.3f}", fontsize=10)
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
    if args.impl == "torch" and args.stage_compute_ms:
        raise UsageError("--stage-compute-ms belongs to --impl own (torch's schedules run "
                         "their own steps)")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl == "torch":
        return TorchPipeline(rt, settings, args.schedule, args.microbatches,
                             virtual_stages(args))
    return OwnPipeline(rt, settings, args.schedule, args.microbatches, args.stage_compute_ms,
                       virtual_stages(args))


def main(argv=None) -> int:
    return run_lab(registry.get("pipeline"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
