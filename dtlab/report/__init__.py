"""``dtlab tour``, ``dtlab profile`` and ``dtlab debug hang``: runs and what they recorded, as
tables (tables.py) and pictures (pictures.py); tour.py, profile.py, hang_report.py do the work.
This package's ``add_commands`` holds the commands' flags and imports nothing heavy."""
from __future__ import annotations

from dtlab.launch import add_placement


def cmd_tour(args, rest) -> int:
    from dtlab.report.tour import tour  # torch: only when the tour runs
    return tour(args.only, args.skip, args.nproc, args.steps, args.out, args.json)


def cmd_profile(args, rest) -> int:
    from dtlab.report import profile  # torch: only when a lab is profiled
    if args.lab == "compare":
        return profile.compare(args.nproc, rest, args.nnodes, args.cluster)
    return profile.profile_one(args.lab, args.nproc, rest, args.nnodes, args.cluster)


def cmd_debug(args, rest) -> int:
    from dtlab.report.hang_report import hang
    return hang(args.run_dir, args.wait)


def add_commands(sub) -> None:
    t = sub.add_parser("tour", help="run every lab and variant this machine can, verified; "
                       "report.md, report.html and pictures in --out")
    t.add_argument("--nproc", type=int, default=None, help="processes for multi-process labs")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--out", default="runs/tour")
    t.add_argument("--only", default=None, help="comma-separated labs to run")
    t.add_argument("--skip", default=None, help="comma-separated labs to leave out")
    t.add_argument("--json", default=None,
                   help="also write the tour's record here (OUT/tour.json always holds it)")
    t.set_defaults(func=cmd_tour)

    pr = sub.add_parser("profile", allow_abbrev=False,
                        help="run a lab under torch.profiler: computation, communication, "
                             "overlap per rank, TensorBoard traces",
                        description="Flags other than --nproc go to the lab; --out DIR gets "
                                    "the run record and DIR/tb the traces (default 8 steps).")
    pr.add_argument("lab", help="a lab, or `compare`: DDP (torch, ours), ZeRO 1-3, FSDP2, TP "
                    "and PP profiled alike, one table")
    pr.add_argument("--nproc", type=int, default=None, help="processes (default: tour size)")
    add_placement(pr)
    pr.set_defaults(func=cmd_profile, forwards=True)

    dbg = sub.add_parser("debug", help="what a hanging run's ranks are doing")
    dsub = dbg.add_subparsers(dest="what", required=True)
    dh = dsub.add_parser("hang", help="every rank's flight record and stacks, and the desync "
                         "report: who is behind, blocked in what, which collectives differ")
    dh.add_argument("run_dir", help="the --out folder of the running job")
    dh.add_argument("--wait", type=float, default=10.0,
                    help="seconds to wait for every rank's answer (default 10)")
    dh.set_defaults(func=cmd_debug)
