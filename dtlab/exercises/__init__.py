"""Exercises: skeletons with TODOs a learner fills (skeletons/), reference solutions
(solutions/), and the checker that grades them (checker.py).

    dtlab exercise ring_allreduce --dest my/       # writes my/ring_allreduce.py
    dtlab check ring_allreduce --impl my/ring_allreduce.py
"""
from __future__ import annotations


def cmd_exercise(args, rest) -> int:
    from dtlab.exercises import checker, progress
    if args.name == "list":
        return list_exercises(checker, progress)
    path = checker.write_skeleton(args.name, args.dest, args.force)
    progress.note_written(args.name, path)
    print(f"wrote {path}: fill in the TODOs, then run\n  dtlab check {args.name} --impl {path}")
    return 0


def list_exercises(checker, progress) -> int:
    """``dtlab exercise list``: the course in order, and where the learner's files stand."""
    rows = progress.rows(list(checker.EXERCISES))
    print(f"{'#':>2}  {'exercise':<18} {'lab':<21} {'page':<26} {'min':>3}  your file")
    for r in rows:
        where = f"{r['file']}: {r['status']}" if r["file"] else r["status"]
        print(f"{r['n']:>2}  {r['exercise']:<18} {r['lab']:<21} {r['page']:<26} "
              f"{r['minutes'] or '-':>3}  {where}")
    print("\nincidents: a broken cluster to repair (dtlab incident start NAME, as root)")
    print("\n".join(progress.incident_lines()))
    print(f"(what dtlab exercise, check and incident noted, in {progress.state_file()}; "
          "docs/exercises.md is the course)")
    return 0


def cmd_check(args, rest) -> int:
    from dtlab.exercises import checker  # torch: the checks run the learner's code
    impl = args.impl or checker.get(args.name).file
    print(f"checking {impl} ({checker.get(args.name).summary}) ...", flush=True)
    passed, lines = checker.check(args.name, impl)
    print("\n".join(lines))
    print("PASS" if passed else "FAIL: see above for what differed")
    from dtlab.exercises import progress
    progress.note_checked(args.name, impl, passed)
    return 0 if passed else 1


def add_commands(sub) -> None:
    ex = sub.add_parser("exercise", help="write an exercise skeleton (TODOs and hints) to fill "
                        "in; `dtlab exercise list` shows the course and where your files stand")
    ex.add_argument("name", help="an exercise (`dtlab exercise list` shows them in course "
                    "order), or list")
    ex.add_argument("--dest", default=".", help="folder to write it into (default: here)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing file")
    ex.set_defaults(func=cmd_exercise)
    ck = sub.add_parser("check", help="grade an exercise: run it through its lab's verification")
    ck.add_argument("name", help="the exercise (see dtlab exercise)")
    ck.add_argument("--impl", default=None, help="your file (default: ./<exercise file>)")
    ck.set_defaults(func=cmd_check)
