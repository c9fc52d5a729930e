"""The flags of checkpoints and injected faults, which every lab takes (the harness adds them
to a lab's parser), and their validation into a checkpoint ``Plan`` and a ``FaultPlan``."""
from __future__ import annotations

import argparse
from pathlib import Path

from dtlab.errors import UsageError
from dtlab.reliability import checkpoint as ckpt
from dtlab.reliability import faults
from dtlab.train.settings import add_common_args


def add_reliability_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    r = p.add_argument_group("checkpoints and injected faults (docs/reliability.md)")
    r.add_argument("--ckpt-dir", default=None,
                   help="write checkpoints here, and resume from the newest complete one")
    r.add_argument("--ckpt-every", type=int, default=5,
                   help="steps between checkpoints (default 5)")
    r.add_argument("--ckpt-keep", type=int, default=2,
                   help="complete checkpoints kept; older ones are deleted (default 2)")
    r.add_argument("--fail-at-step", type=int, default=None,
                   help="kill --fail-rank with SIGKILL at the start of this step "
                        "(first attempt only)")
    r.add_argument("--fail-rank", type=int, default=0,
                   help="rank that --fail-at-step kills (default 0)")
    r.add_argument("--fail-in", default="step", choices=["step", "checkpoint"],
                   help="checkpoint: die while writing the first checkpoint at or after "
                        "--fail-at-step instead (default step)")
    r.add_argument("--stall-at-step", type=int, default=None,
                   help="--stall-rank stops answering at the start of this step")
    r.add_argument("--stall-rank", type=int, default=0, help="rank that stalls (default 0)")
    r.add_argument("--mismatch-at-step", type=int, default=None,
                   help="--mismatch-rank issues a collective no other rank issues at the start "
                        "of this step (docs/debugging.md)")
    r.add_argument("--mismatch-rank", type=int, default=0,
                   help="rank that issues the extra collective (default 0)")
    return p


def plans_from_args(args: argparse.Namespace, settings, world: int, lab: str,
                    no_checkpoint: str | None = None) -> tuple[ckpt.Plan, faults.FaultPlan]:
    """The checkpoint and fault flags, validated. ``no_checkpoint``: why this lab cannot
    checkpoint, if it cannot (the registry's ``Lab.no_checkpoint``)."""
    plan = ckpt.Plan(args.ckpt_dir, args.ckpt_every, args.ckpt_keep)
    if plan.ckpt_dir is not None and no_checkpoint:
        raise UsageError(f"--ckpt-dir: lab {lab!r} cannot checkpoint: {no_checkpoint}")
    if plan.ckpt_every < 1:
        raise UsageError(f"--ckpt-every must be >= 1, got {plan.ckpt_every}")
    if plan.ckpt_keep < 1:
        raise UsageError(f"--ckpt-keep must be >= 1, got {plan.ckpt_keep}")
    if plan.ckpt_dir is not None:
        d = Path(plan.ckpt_dir)
        if d.exists() and not d.is_dir():
            raise UsageError(f"--ckpt-dir {d} is a file; give a folder (it is created if missing)")
    fp = faults.FaultPlan(args.fail_at_step, args.fail_rank, args.fail_in, args.stall_at_step,
                          args.stall_rank, args.mismatch_at_step, args.mismatch_rank)
    if (msg := fp.check(world, settings.steps, plan.ckpt_dir)):
        raise UsageError(msg)
    return plan, fp


def lab_flags(args: argparse.Namespace) -> dict:
    """The lab's own flags (--stage, --impl, ...): the command-line values minus the common run
    settings (which ``Settings`` already holds) and these flags: what a checkpoint's identity
    records of the layout."""
    common = {a.dest for a in add_reliability_args(add_common_args(
        argparse.ArgumentParser()))._actions}
    return {k: v for k, v in sorted(vars(args).items()) if k not in common}
