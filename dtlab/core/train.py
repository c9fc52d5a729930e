"""The one training loop. The single-process baseline is this loop at world size 1.

    for step in range(steps):
        x, y   = corpus.global_batch(step)          # same data for every strategy
        x, y   = strategy.local_batch(x, y)         # e.g. this rank's rows
        loss   = strategy.forward_backward(x, y)    # forward, loss, backward
        strategy.after_backward()                   # e.g. wait for gradient all-reduces
        strategy.optimizer_step()
        record the loss of the whole global batch, the step time and the bytes communicated

A lab is a :class:`Strategy` subclass that overrides the hooks it changes (DDP wraps the model;
ZeRO replaces ``optimizer_step``; a pipeline replaces ``forward_backward``), plus ``main``, which
is one call to :func:`run_lab`. Afterwards rank 0 collects the full parameters, reruns (or reads a
cached) baseline with identical settings, and writes the run record.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dtlab.core import checkpoint as ckpt
from dtlab.core import faults, flight, record, runtime
from dtlab.core import memory as mem
from dtlab.core.comm import CommCounter
from dtlab.core.data import check_divisible, rank_slice
from dtlab.core.errors import UsageError
from dtlab.core.flops import UtilisationSampler, flops_record
from dtlab.core.model import ToyGPT, build_model, loss_fn
from dtlab.core.profiler import StepProfiler
from dtlab.core.settings import (Settings, add_common_args, lab_flags, plans_from_args,
                                 settings_from_args)


# --------------------------------------------------------------------------- strategy

class Strategy:
    """Plain training on one process; labs subclass it and override the hooks they change.
    The class attributes below are the flags a lab sets (the defaults are the baseline's)."""

    name = "baseline"
    variant = "single"
    dtype = "fp32"
    tolerance = record.FP32_TOLERANCE
    checks_ok = True            # a lab with its own checks (e.g. against a library op) sets this
    equivalent = True           # False for strategies not equal to the baseline by design,
    drift_reason = ""           # and why, in a few words ("1 step skipped", "Hogwild")
    whole_batch = False         # True: every rank takes the whole global batch (TP, PP)

    def __init__(self, rt: runtime.Runtime, settings: Settings):
        self.rt, self.settings = rt, settings
        self.comm = CommCounter(rt.world_size)
        self.meter = mem.ActivationMeter()
        self.extra: dict = {}
        self.lab = self.name
        self.ckpt_plan, self.fault_plan = ckpt.Plan(), faults.FaultPlan()
        self.current_step: int | None = None
        self.lab_flags: dict = {}
        self.trajectory: tuple[list, list] = ([], [])
        self.flight = None  # a FlightRecorder while the loop runs with a process group

    # ---- set-up
    def build(self) -> None:
        """Create ``self.model`` and ``self.optimizer``."""
        self.model = build_model(self.settings.model, self.rt.device)
        self.optimizer = self.make_optimizer(self.model.parameters())

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, **self.settings.adamw())

    @property
    def dp_rank(self) -> int:
        return 0 if self.whole_batch else self.rt.rank

    @property
    def dp_world(self) -> int:
        return 1 if self.whole_batch else self.rt.world_size

    # ---- one step
    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rank_slice(x, self.dp_rank, self.dp_world), rank_slice(y, self.dp_rank, self.dp_world)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.meter.measure(self.model.parameters()):
            loss = loss_fn(self.model(x), y)
        loss.backward()
        return loss.detach()

    def after_backward(self) -> None:
        pass

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def global_loss(self, local_loss: torch.Tensor) -> float:
        """Loss of the whole global batch: the mean of the data-parallel ranks' equal slices.
        This all-reduce is bookkeeping, not training traffic, so it is not counted."""
        if self.rt.distributed and self.dp_world > 1:
            t = local_loss.detach().clone().float()
            dist.all_reduce(t)
            return t.item() / self.rt.world_size
        return local_loss.item()

    # ---- afterwards
    def num_params(self) -> int:
        """Parameters of the whole model (not of this rank's shard)."""
        return ToyGPT.count_params(self.settings.model)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Full parameters under the baseline's names, on rank 0 (None elsewhere). Every rank
        calls it: a DTensor parameter (DTensor TP, FSDP2) is gathered by ``full_tensor()``, a
        collective."""
        m = getattr(self.model, "module", self.model)
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                for k, v in m.named_parameters()}
        return full if self.rt.is_main else None

    def memory(self) -> dict:
        params = list(self.model.parameters())
        return mem.snapshot(params, self.optimizer, self.meter, self.rt.device)

    # ---- checkpoints (dtlab.core.checkpoint): what determines the rest of the run
    def canonical_state(self) -> dict[str, torch.Tensor]:
        """Every parameter under the baseline's name, its AdamW moments and the step count, as
        whole CPU tensors on every rank, whatever the layout: what a checkpoint holds, so any
        layout can resume it. A collective where the state is sharded; labs that shard it in
        their own way override this and ``load_canonical_state``."""
        m = getattr(self.model, "module", self.model)
        return ckpt.adam_named(dict(m.named_parameters()), self.optimizer)

    def load_canonical_state(self, full: dict[str, torch.Tensor]) -> None:
        m = getattr(self.model, "module", self.model)
        ckpt.load_adam_named(dict(m.named_parameters()), self.optimizer, full)

    def gather_object(self, obj) -> list:
        """Every rank's ``obj`` as a list on rank 0 (processes without a process group, such as
        torch.multiprocessing workers, override this)."""
        if not self.rt.distributed:
            return [obj]
        out = [None] * self.rt.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.rt.barrier()

    def close(self) -> None:
        """Drop the model and optimizer before the process group goes. A DDP wrapper still alive
        at interpreter exit, after its group was destroyed, can abort the process from C++."""
        self.model = self.optimizer = None
        gc.collect()


# --------------------------------------------------------------------------- loop

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(strategy: Strategy, log_every: int | None = None,
          profile: bool = True) -> tuple[list[float], list[dict]]:
    rt, s = strategy.rt, strategy.settings
    corpus = s.corpus()
    losses, steps = strategy.trajectory = [], []  # the failure report reads the history so far
    start = ckpt.resume(strategy, losses, steps)
    if log_every is None:
        log_every = max(1, s.steps // 10)
    prof = StepProfiler(s.profile_dir, rt.rank, s.steps, rt.device.type) \
        if profile and s.profile_dir else None
    with contextlib.ExitStack() as stack:
        if rt.distributed:  # the flight recorder (dtlab/core/flight.py): what a hang dumps
            strategy.flight = stack.enter_context(
                flight.FlightRecorder(rt.rank, rt.world_size, s.out))
            stack.enter_context(flight.Watchdog(strategy.flight, s.out))
        stack.enter_context(prof or contextlib.nullcontext())
        _steps(strategy, corpus, losses, steps, log_every, prof, start)
    if prof is not None:
        strategy.extra["profile"] = prof.summary
    return losses, steps


def _steps(strategy, corpus, losses, steps, log_every, prof, start=0) -> None:
    rt, s = strategy.rt, strategy.settings
    plan, fp = strategy.ckpt_plan, strategy.fault_plan
    for step in range(start, s.steps):
        strategy.current_step = step
        if strategy.flight is not None:
            strategy.flight.set_step(step)
        fp.before_step(rt, step)
        x, y = corpus.global_batch(step)
        x, y = strategy.local_batch(x.to(rt.device), y.to(rt.device))
        _sync(rt.device)
        t0 = time.perf_counter()
        loss = strategy.forward_backward(x, y)
        strategy.after_backward()
        strategy.optimizer_step()
        _sync(rt.device)
        dt = time.perf_counter() - t0
        strategy.comm.end_step()
        losses.append(strategy.global_loss(loss))
        steps.append({"step": step, "loss": losses[-1], "step_s": dt,
                      "comm_bytes": strategy.comm.step_sent[-1]})
        if log_every and (step % log_every == 0 or step == s.steps - 1):
            rt.log(f"step {step:4d}  loss {losses[-1]:.4f}  {dt * 1e3:7.1f} ms")
        if plan.due(step + 1, s.steps):
            steps[-1]["ckpt_s"] = ckpt.save(strategy, step + 1, losses, steps)
        if prof is not None:
            prof.step()


def baseline(settings: Settings, device: torch.device) -> tuple[list[float], dict]:
    """The reference trajectory: this loop, one process, the whole global batch (cached),
    without recomputation (which must not change a bit)."""
    settings = dataclasses.replace(
        settings, model=dataclasses.replace(settings.model, recompute="none", recompute_every=2))
    key = record.cache_key({**settings.identity(), "device": device.type})
    hit = record.load_cached(key)
    if hit is not None:
        return hit
    rt = runtime.Runtime(device=device)
    strat = Strategy(rt, settings)
    strat.build()
    losses, _ = train(strat, log_every=0, profile=False)
    params = strat.full_state()
    record.store_cached(key, losses, params)
    return losses, params


def run(strategy: Strategy, lab: str, compare_baseline: bool = True,
        log_every: int | None = None) -> dict | None:
    """Build, train, compare with the baseline, write the record; the summary on rank 0."""
    rt, s = strategy.rt, strategy.settings
    t_wall = time.perf_counter()
    strategy.lab = lab
    strategy.build()
    if s.model.recompute != "none":  # after build: some labs choose or set it there
        strategy.variant = f"{strategy.variant}+recompute-{s.model.recompute}"
    rt.log(f"{lab} [{strategy.variant}]  world {rt.world_size}  {rt.backend}/{rt.device}  "
           f"preset {s.preset} ({strategy.num_params():,} parameters)"
           f"  global batch {s.batch_size} x {s.model.seq_len} tokens  {s.steps} steps")
    with UtilisationSampler(rt.device) as sampler:  # GPU (NVML) or this process's CPU
        losses, steps = train(strategy, log_every)
    wall = time.perf_counter() - t_wall
    utilisation = strategy.gather_object(sampler.summary())
    full = strategy.full_state()
    if "profile" in strategy.extra:  # every rank's own summary, on rank 0
        strategy.extra["profile"] = strategy.gather_object(strategy.extra["profile"])
    mems = strategy.gather_object(strategy.memory())
    comms = strategy.gather_object(strategy.comm.summary())
    hosts = strategy.gather_object(socket.gethostname())  # which machine (or node) ran each rank
    # Every rank leaves the process group together before rank 0 turns to the baseline, so no
    # rank sits in a collective (or tears a connection down) while rank 0 computes alone.
    strategy.barrier()
    strategy.close()
    runtime.shutdown(rt)
    if not rt.is_main:
        return None
    step_s = statistics.median(st["step_s"] for st in steps)
    cmp = _compare(strategy, losses, full, compare_baseline)
    comm = dict(comms[0])
    comm["per_rank"] = [c["bytes_per_step"] for c in comms]
    flops = flops_record(s.model, s.batch_size, step_s, rt.world_size, rt.device,
                         strategy.dtype)
    flops["utilisation_per_rank"] = utilisation
    nonfinite = record.first_nonfinite(losses, full)
    summary = record.build_summary(
        strategy, losses, cmp,
        time={"step_s_median": step_s, "tokens_per_s": s.batch_size * s.model.seq_len / step_s,
              "wall_s": wall},
        comm=comm, memory={"per_rank": mems}, flops=flops,
        params_sha256=record.params_digest(full),
        ok=record.verdict(cmp, strategy.checks_ok, nonfinite))
    summary["hosts"] = hosts
    if nonfinite is not None:
        summary["nonfinite"] = nonfinite
        print(f"dtlab: error: the run diverged: {record.describe_nonfinite(nonfinite)}",
              file=sys.stderr, flush=True)
    record.write_record(Path(s.out), summary, steps)
    verdict = {True: "OK", False: "OUTSIDE TOLERANCE", None: "not compared"}[cmp["ok"]]
    if cmp["ok"] is not None and cmp["max_rel_loss_diff"] is not None:
        rt.log(f"baseline: max |loss diff| {cmp['max_abs_loss_diff']:.2e} "
               f"(rel {cmp['max_rel_loss_diff']:.2e}), max |param diff| "
               f"{cmp['max_abs_param_diff']:.2e}  -> {verdict}")
    rt.log(f"wrote {Path(s.out) / 'summary.json'}")
    return summary


def _compare(strategy: Strategy, losses: list[float], full: dict, compare_baseline: bool) -> dict:
    """The baseline comparison of the run (rank 0)."""
    s, rt = strategy.settings, strategy.rt
    if not compare_baseline:
        return {"max_abs_loss_diff": None, "max_rel_loss_diff": None,
                "max_abs_param_diff": None, "tolerance": dict(strategy.tolerance), "ok": None}
    base_losses, base_params = baseline(s, rt.device)
    cmp = record.compare(losses, full, base_losses, base_params, strategy.tolerance)
    cmp["losses"] = base_losses  # the reference curve, for plots
    if not strategy.equivalent and "nonfinite" not in cmp:
        cmp["ok"] = None  # the drift is the expected outcome: reported, not judged
        cmp["note"] = strategy.drift_reason or "not numerically equivalent by design"
    return cmp


def _launched(rt: runtime.Runtime | None) -> bool:
    """A rank started by a launcher (torchrun and the like), not a plain or spawned process."""
    return rt is None and int(os.environ.get("WORLD_SIZE", "1")) > 1


def lock_folders(out: str, ckpt_dir: str | None) -> list[ckpt.FolderLock]:
    """Hold ``--out`` and ``--ckpt-dir`` for this run (the same folder once)."""
    locks = [ckpt.FolderLock(out, "--out").acquire()]
    if ckpt_dir is not None and Path(ckpt_dir).resolve() != Path(out).resolve():
        try:
            locks.append(ckpt.FolderLock(ckpt_dir, "--ckpt-dir").acquire())
        except UsageError:
            locks[0].release()
            raise
    return locks


def run_lab(lab, parser: argparse.ArgumentParser, make_strategy, argv=None,
            check_args=None, rt: runtime.Runtime | None = None) -> int:
    """A lab's ``main``: parse, join the process group, run, report. ``lab``: the registry's
    entry (or a bare name, for labs outside the registry). Exit status 0 when within tolerance,
    1 when outside, 2 for bad input, 3 when the process group failed. ``rt``: a runtime the
    caller made (torch.multiprocessing workers) instead of one from the environment."""
    name = getattr(lab, "name", lab)
    args = parser.parse_args(argv)
    launched = _launched(rt)
    rank = rt.rank if rt else int(os.environ.get("RANK", "0"))
    summary, locks = None, []
    try:
        settings = settings_from_args(args)
        world = rt.world_size if rt else int(os.environ.get("WORLD_SIZE", "1"))
        if check_args is not None:
            check_args(args, settings, world)
        else:
            check_divisible(settings.batch_size, world)
        if settings.model.moe_experts and not getattr(lab, "moe", False):
            raise UsageError(f"--moe-experts: lab {name!r} does not run the mixture-of-experts "
                             "model; run it with baseline or expert_parallel")
        plan, fault_plan = plans_from_args(args, settings, world, name,
                                           getattr(lab, "no_checkpoint", None))
        if rank == 0:  # one run per output and checkpoint folder: a second is refused
            locks = lock_folders(settings.out, plan.ckpt_dir)
        rt = rt or runtime.init(args.backend, args.device, args.timeout, args.seed)
        strategy = make_strategy(rt, settings, args)
        strategy.ckpt_plan, strategy.fault_plan = plan, fault_plan
        strategy.lab_flags = lab_flags(args)
        try:
            summary = run(strategy, name, compare_baseline=not args.no_baseline,
                          log_every=args.log_every)
        except RuntimeError as e:
            if not (rt.distributed and faults.is_comm_failure(e)):
                raise
            code = faults.report_failure(strategy, name, e)
            if launched:
                runtime.exit_now(code)
            return code
    except UsageError as e:
        if rank == 0:
            print(f"dtlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    except runtime.RuntimeSetupError as e:
        print(f"dtlab: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        for lock in locks:
            lock.release()
        if rt is not None:
            runtime.shutdown(rt)
    code = 0 if summary is None or summary["ok"] else 1  # summary is None off rank 0
    if launched:
        runtime.exit_now(code)  # a launched rank: no interpreter teardown (see exit_now)
    return code
