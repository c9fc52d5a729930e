"""``dtlab``: parse the command line and hand it to the command family that does the work.

    dtlab list [--names]
    dtlab run LAB [--nproc N] [--max-restarts R] [lab flags...]
    dtlab tour [--nproc N] [--steps S] [--out DIR] [--only a,b] [--skip c]
    dtlab bench comm [--nproc 2,4] [--ops ...] [--impl library,ring,...] [--sizes ...] [--json F]
    dtlab bench ddp [--nproc 2] [--preset small] [--steps 30] [--repeats 3]
    dtlab profile LAB|compare [--nproc N] [lab flags...]
    dtlab doctor [--hostfile F] [--include S | --exclude S] [--master-addr A] [--json]
    dtlab plan [calibrate|validate] [--preset small | --layers L --d-model H --heads A] ...
    dtlab memory --params 7e9 [--nodes N --gpus-per-node G] [--zero 0|1|2|3] [--offload ...]
    dtlab exercise NAME|list [--dest DIR]   /   dtlab check NAME [--impl FILE]
    dtlab incident list | start NAME | check NAME | give-up NAME        (root)

Every family owns its commands' flags (``add_commands`` in dtlab/launch, report, bench, doctor,
plan, cluster, docsgen, exercises and incidents, each import-light so that ``dtlab --help`` and ``dtlab
cluster down`` need no torch); nothing here plans, runs or renders. Bad input is one line on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from dtlab import (bench, cluster, docsgen, doctor, exercises, incidents, launch, plan, registry,
                   report)
from dtlab.errors import UsageError, fail

# in --help order
FAMILIES = (launch, report, bench, doctor, plan, cluster, docsgen, exercises, incidents)


def cmd_list(args, rest) -> int:
    if args.names:  # one name a line, for scripts (the launchers check lab names with it)
        print("\n".join(registry.LABS))
        return 0
    from rich.table import Table

    from dtlab.report.tables import console
    t = Table(title="dtlab labs")
    for c in ("lab", "what it shows", "processes", "status"):
        t.add_column(c)
    for lab in registry.LABS.values():
        t.add_row(lab.name, lab.summary, lab.world_text(), lab.status())
    console(120).print(t)
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtlab", description="Distributed-training lab.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every lab, one line, and whether it can run here")
    ls.add_argument("--names", action="store_true", help="only the names, one a line")
    ls.set_defaults(func=cmd_list)
    for family in FAMILIES:
        family.add_commands(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = make_parser().parse_known_args(argv)
    if rest and not getattr(args, "forwards", False):
        fail(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except UsageError as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
