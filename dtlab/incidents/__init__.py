"""Incidents: a broken cluster to diagnose and repair with the lab's own tools (root).

    dtlab incident list                   every incident, what it teaches, how you stand
    dtlab incident start NAME [--dir D]   the incident cluster (inc1, inc2) up and broken one way;
                                          prints the symptom; your files in D (./incident-NAME)
    dtlab incident check NAME             runs the real job (bash launch.sh): passes only when it
                                          ran on every node at the original world size, trained
                                          equal to the baseline, and the cause reads back as fixed
    dtlab incident give-up NAME           the cause, the fix, the command that finds it fastest

``catalogue.py`` holds the incidents (each breaks one thing and reads it back); ``runner.py``
brings the cluster up, runs and judges the job, and takes everything down after a pass or a
give-up. docs/exercises.md is the course they belong to.
"""
from __future__ import annotations


def cmd_incident(args, rest) -> int:
    from dtlab.exercises import progress
    if args.action == "list":
        print("\n".join(progress.incident_lines()))
        print("(dtlab incident start NAME, as root; docs/exercises.md is the course)")
        return 0
    from dtlab.incidents import runner
    if args.action == "start":
        runner.start(args.name, args.dir)
        return 0
    if args.action == "check":
        return 0 if runner.check(args.name, args.deadline) else 1
    runner.give_up(args.name)
    return 0


def add_commands(sub) -> None:
    ic = sub.add_parser("incident", help="a broken cluster to diagnose and repair: list, start, "
                        "check, give-up (root)")
    isub = ic.add_subparsers(dest="action", required=True)
    isub.add_parser("list", help="every incident and where you stand")
    st = isub.add_parser("start", help="bring the incident cluster up, broken; print the symptom")
    st.add_argument("name")
    st.add_argument("--dir", default=None, help="your folder: hostfile, launch.sh, ... "
                    "(default ./incident-NAME)")
    ck = isub.add_parser("check", help="run the real job and say whether the incident is fixed")
    ck.add_argument("name")
    ck.add_argument("--deadline", type=float, default=120.0,
                    help="seconds the job may take before it is stopped (default 120)")
    gu = isub.add_parser("give-up", help="the cause and the fix; takes the cluster down")
    gu.add_argument("name")
    ic.set_defaults(func=cmd_incident)
