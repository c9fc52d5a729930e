"""Everything around a lab's run: parse its flags, join the process group, run the training
loop with its step hooks (checkpoints, injected faults, the flight recorder, the profiler),
compare with the baseline and write the run record. A lab's ``main`` is one call to
:func:`run_lab`; the loop it reads (dtlab/train/loop.py) knows none of this."""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from dtlab.errors import UsageError
from dtlab.measure import run_record as record
from dtlab.measure.flops import UtilisationSampler, flops_record
from dtlab.measure.profiler import StepProfiler
from dtlab.reliability import checkpoint as ckpt
from dtlab.reliability import faults
from dtlab.reliability.hooks import reliability_hooks
from dtlab.reliability.options import add_reliability_args, lab_flags, plans_from_args
from dtlab.train import runtime
from dtlab.train import settings as run_settings
from dtlab.train.data import check_divisible
from dtlab.train.loop import Strategy, baseline, train
from dtlab.train.model import counted_flops_per_step, formula_flops_per_step
from dtlab.train.settings import settings_from_args


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every lab takes: the run settings and the reliability flags."""
    return add_reliability_args(run_settings.add_common_args(p))


def step_hooks(strategy: Strategy, profile: bool = True) -> list:
    hooks = reliability_hooks(strategy)
    s = strategy.settings
    if profile and s.profile_dir:
        hooks.append(StepProfiler(s.profile_dir, strategy.rt.rank, s.steps,
                                  strategy.rt.device.type))
    return hooks


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
        losses, steps = train(strategy, step_hooks(strategy), log_every)
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
    flops = flops_record(counted_flops_per_step(s.model, s.batch_size),
                         formula_flops_per_step(s.model, s.batch_size), step_s, rt.world_size,
                         rt.device, strategy.dtype)
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
