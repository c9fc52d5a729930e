"""``dtlab run``: a lab under torchrun on this machine, or on the namespace cluster's nodes
(launcher.py; torchrun.py builds the torchrun command). This package's ``add_commands`` holds the
command's flags; it imports nothing heavy, so ``dtlab --help`` needs no torch."""
from __future__ import annotations

import argparse


def add_placement(p: argparse.ArgumentParser) -> None:
    """Where a command's ranks run: this machine, or nodes of the namespace cluster."""
    p.add_argument("--nnodes", type=int, default=1,
                   help="run on this many nodes of the namespace cluster (dtlab cluster up), "
                        "--nproc processes on each (default 1: this machine alone)")
    p.add_argument("--cluster", default="main", help="which namespace cluster (default main)")


def cmd_run(args, rest) -> int:
    from dtlab.launch.launcher import run_one  # torch: only when a lab is launched
    return run_one(args.lab, args.nproc, rest, args.max_restarts, args.nnodes, args.cluster,
                   args.run_timeout)


def add_commands(sub) -> None:
    r = sub.add_parser("run", allow_abbrev=False,
                       help="run one lab under torchrun and compare it with the baseline",
                       description="Flags other than --nproc, --max-restarts, --run-timeout, "
                                   "--nnodes and --cluster go to the lab "
                                   "(python -m labs.LAB --help lists them).")
    r.add_argument("lab")
    r.add_argument("--nproc", type=int, default=None,
                   help="processes (default: the lab's tour size)")
    r.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts after a rank dies (use with the lab's --ckpt-dir)")
    r.add_argument("--run-timeout", type=float, default=None, metavar="S",
                   help="stop the whole run (agents and ranks) after S seconds, exit status 124 "
                        "(default: no limit; a hung collective still ends at the lab's --timeout)")
    add_placement(r)
    r.set_defaults(func=cmd_run, forwards=True)
