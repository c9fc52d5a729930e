"""Pipeline parallelism: the model cut into P stages, micro-batches flowing through, GPipe and 1F1B.

Answers QUESTIONS.md 4, 11, 24-26. Rank r holds stage r (contiguous layers from
``model.stages(P)``); activations go forward to r+1 and their gradients come back from r+1 by
point-to-point messages. One stage alone would leave P-1 devices idle, so the batch is cut into M
micro-batches: while stage 1 works on micro-batch 0, stage 0 starts micro-batch 1. Gradients of
the micro-batches add up before the one optimizer step (gradient accumulation), so the run equals
the baseline.

A schedule is a list of actions per rank, ``("F", m)`` or ``("B", m)``, executed in order:
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
ScheduleGPipe, Schedule1F1B).

Run:
    torchrun --nproc_per_node=2 -m labs.pipeline --schedule 1f1b --microbatches 4
    dtlab run pipeline --nproc 4 --preset small --schedule gpipe --microbatches 8 --stage-compute-ms 20
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from labs.core import memory as mem
from labs.core.comm import library_collectives, nbytes
from labs.core.model import ToyGPT, loss_fn, stage_bounds
from labs.core.train import Strategy, UsageError, add_common_args, run_lab


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


SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def bubble_theory(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


class OwnPipeline(Strategy):
    checkpoint_sharded = True  # every rank holds its own stage
    name = "pipeline"

    def __init__(self, rt, settings, schedule: str, microbatches: int, compute_ms: float):
        super().__init__(rt, settings)
        self.schedule_name, self.m, self.compute_s = schedule, microbatches, compute_ms / 1e3
        self.variant = f"own-{schedule}"
        self.timelines: list[list] = []
        self.peak_live, self.peak_live_bytes = 0, 0

    # every stage sees the whole batch (the first needs the tokens, the last the targets)
    whole_batch = True

    # Where this rank sits in the pipeline. Here every rank is one stage; parallel3d.py places
    # several pipelines side by side and overrides these.
    def pipeline_position(self) -> tuple[int, int, int | None, int | None]:
        """(stage index, number of stages, rank of the previous stage, rank of the next)."""
        p, r = self.rt.world_size, self.rt.rank
        return r, p, (r - 1 if r > 0 else None), (r + 1 if r < p - 1 else None)

    def stage_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, y)

    def build(self) -> None:
        self.stage_index, p, self.prev_rank, self.next_rank = self.pipeline_position()
        self.n_stages = p
        self.full = ToyGPT(self.settings.model).to(self.rt.device)  # same init as the baseline
        self.lo, self.hi = stage_bounds(self.settings.model.n_layer, p)[self.stage_index]
        self.stage = self.full.stages(p)[self.stage_index]
        self.model = self.stage
        self.optimizer = self.make_optimizer(self.stage.parameters())
        self.actions = SCHEDULES[self.schedule_name](p, self.m, self.stage_index)
        self.extra.update(stages=p, microbatches=self.m, schedule=self.schedule_name,
                          stage_layers=[self.lo, self.hi], actions=[f"{a}{i}" for a, i in
                                                                    self.actions])

    def _busy(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            time.sleep(min(1e-3, max(0.0, end - time.perf_counter())))

    def forward_backward(self, x, y):
        m = self.m
        first, last = self.prev_rank is None, self.next_rank is None
        cfg = self.settings.model
        xs, ys = x.chunk(m), y.chunk(m)
        self.optimizer.zero_grad(set_to_none=True)
        inputs, outputs, live, live_bytes, sends = {}, {}, {}, 0, []
        total_loss = torch.zeros((), device=self.rt.device)
        timeline = []
        if self.rt.distributed:
            dist.barrier()
        for kind, i in self.actions:
            t0 = time.time()
            if kind == "F":
                if first:
                    inp = xs[i]
                else:
                    inp = torch.empty(xs[i].shape[0], cfg.seq_len, cfg.d_model,
                                      device=self.rt.device)
                    dist.recv(inp, self.prev_rank, tag=2 * i)
                    inp.requires_grad_(True)
                t1 = time.time()  # waiting for the message is idle time, not work
                with self.meter.measure(self.stage.parameters()) as meter:
                    out = self.stage(inp)
                    if last:
                        out = self.stage_loss(out, ys[i]) / m  # mean of equal micro means
                live[i] = meter.last
                live_bytes += meter.last
                self.peak_live = max(self.peak_live, len(live))
                self.peak_live_bytes = max(self.peak_live_bytes, live_bytes)
                inputs[i], outputs[i] = inp, out
                self._busy(self.compute_s)
                if last:
                    total_loss += out.detach()
                else:
                    sends.append(dist.isend(out.detach(), self.next_rank, tag=2 * i))
                    self.comm.record("send", out, sent_bytes=nbytes(out))
            else:
                out = outputs.pop(i)
                if last:
                    t1 = time.time()
                    out.backward()
                else:
                    grad = torch.empty_like(out)
                    dist.recv(grad, self.next_rank, tag=2 * i + 1)
                    t1 = time.time()
                    out.backward(grad)
                inp = inputs.pop(i)
                self._busy(2 * self.compute_s)
                if not first:
                    sends.append(dist.isend(inp.grad, self.prev_rank, tag=2 * i + 1))
                    self.comm.record("send", inp.grad, sent_bytes=nbytes(inp.grad))
                live_bytes -= live.pop(i)
            timeline.append((kind, i, t1, time.time(), t0))
        for s in sends:
            s.wait()
        self.timelines.append(timeline)
        return total_loss

    def global_loss(self, local_loss: torch.Tensor) -> float:
        """Only the last stage knows the loss; it is shared for the record (not counted)."""
        t = local_loss.detach().clone() if self.next_rank is None else \
            torch.zeros((), device=self.rt.device)
        if self.rt.distributed:
            dist.all_reduce(t)
        return t.item()

    def num_params(self) -> int:
        return ToyGPT.count_params(self.settings.model)

    def full_state(self):
        mine = {n: p.detach().cpu() for n, p in self.full.named_parameters()
                if self.lo <= int(n.split(".")[1]) < self.hi}
        parts = self.gather_object(mine)
        if not self.rt.is_main:
            return None
        return {k: v for part in parts for k, v in part.items()}

    def memory(self) -> dict:
        snap = mem.snapshot(list(self.stage.parameters()), self.optimizer, self.meter,
                            self.rt.device)
        snap["activations_peak"] = self.peak_live_bytes  # all live micro-batches at once
        return snap

    def close(self) -> None:
        # The first step includes warm-up (allocations, connections); measure the later ones.
        steps = self.timelines[1:] or self.timelines
        per_rank = self.gather_object({"timelines": steps, "peak_live": self.peak_live,
                                       "peak_live_bytes": self.peak_live_bytes})
        if self.rt.is_main:
            self.extra.update(analyse(per_rank, self.rt.world_size, self.m))
            draw_schedule(per_rank, self.settings.out, self.variant, self.extra)
        super().close()


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


class TorchPipeline(OwnPipeline):
    """The same stages through torch.distributed.pipelining's own schedules."""

    def build(self) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        super().build()
        self.variant = f"torch-{self.schedule_name}"
        stage = PipelineStage(self.stage, self.rt.rank, self.rt.world_size, self.rt.device)
        cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        # loss per micro-batch; the schedule divides the gradients by M (scale_grads)
        self.sched = cls(stage, n_microbatches=self.m, loss_fn=loss_fn)

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        r, last = self.rt.rank, self.rt.rank == self.rt.world_size - 1
        losses: list[torch.Tensor] = []
        # Saved tensors of the whole step: an upper bound on the live activations here, since
        # torch's schedule frees each micro-batch's after its backward.
        with self.meter.measure(self.stage.parameters()), library_collectives(self.comm):
            if r == 0:
                self.sched.step(x)
            elif last:
                self.sched.step(target=y, losses=losses)
            else:
                self.sched.step()
        if last:
            return torch.stack(losses).mean().detach()
        return torch.zeros((), device=self.rt.device)

    def memory(self) -> dict:
        return mem.snapshot(list(self.stage.parameters()), self.optimizer, self.meter,
                            self.rt.device)

    def close(self) -> None:
        Strategy.close(self)  # no timeline of our own: the schedule is torch's


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", "torch"])
    p.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
    p.add_argument("--microbatches", type=int, default=4, help="M (default 4)")
    p.add_argument("--stage-compute-ms", type=float, default=0.0,
                   help="known busy time added to every forward (and twice to every backward)")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    n_layer = settings.model.n_layer
    if world > n_layer:
        raise UsageError(f"{world} pipeline stages but preset {settings.preset!r} has {n_layer} "
                         f"blocks; use --nproc <= {n_layer} or a preset with more layers")
    if args.microbatches < 1 or settings.batch_size % args.microbatches:
        raise UsageError(f"--microbatches {args.microbatches} must be >= 1 and divide --batch-size "
                         f"{settings.batch_size}")
    if args.stage_compute_ms < 0:
        raise UsageError("--stage-compute-ms must be >= 0")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl == "torch":
        return TorchPipeline(rt, settings, args.schedule, args.microbatches, args.stage_compute_ms)
    return OwnPipeline(rt, settings, args.schedule, args.microbatches, args.stage_compute_ms)


def main(argv=None) -> int:
    return run_lab("pipeline", make_parser(), make_strategy, argv, check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
