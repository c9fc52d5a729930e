"""The small runs behind answers 1-33 of docs/questions.md that no other record holds, as one
record: the ``dtlab memory`` estimate question 8 quotes, and question 9's comparison of data
parallelism with one process: one process and two ranks on the same global batch, given the same
cores in all (the launcher sets ``OMP_NUM_THREADS`` to the machine's cores over the processes:
2 threads for the one process, 1 for each of the two ranks, on this 2-core machine).

    python -m dtlab.docsgen.records.answer_runs --json docs/reference/answers-q1-33.json

Each entry keeps the command exactly as the page quotes it (``command``). The two runs alternate
``--repeats`` times and the record keeps every step-time median, so one slow repeat (the machine
is shared) shows; the load average before each run is kept too.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from dtlab.docsgen.records.lab_runs import memory_estimate, new_record, run_one, write_record
from dtlab.report import records

MEMORY = ("memory-1.3b", ["--params", "1.3B", "--gpus-per-node", "1"])
# the same global batch (64 sequences of the tiny preset) on 1 process and on 2 ranks
SPEEDUP = [("one-process", "baseline", 1, ["--preset", "tiny", "--batch-size", "64", "--steps",
                                           "20"]),
           ("two-ranks", "ddp", 2, ["--preset", "tiny", "--batch-size", "64", "--steps", "20"])]
KEEP = ("lab", "variant", "world_size", "preset", "steps", "batch_size", "n_params", "baseline",
        "time", "comm")


def lab_one(name: str, lab: str, nproc: int, flags: list[str], work: Path) -> dict:
    """One run, the load average before it and the threads each rank had."""
    load = os.getloadavg()[0]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the launcher's
    s = run_one(name, lab, nproc, flags, work, keep=KEEP, env=env, timeout=600)
    s["load_average_before"] = load
    s["threads_per_rank"] = max(1, (os.cpu_count() or 1) // nproc)  # as the launcher sets it
    return s


def make_parser():
    p = records.record_tool_parser("python -m dtlab.docsgen.records.answer_runs",
                                   __doc__.splitlines()[0])
    p.add_argument("--work", default="runs/docs/answers", help="where the runs write")
    p.add_argument("--repeats", type=int, default=3, help="alternations of the two runs")
    return p


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    work = Path(a.work)
    rec = new_record("the runs behind answers 1-33 of docs/questions.md that no other record holds "
                   "(python -m dtlab.docsgen.records.answer_runs)")
    t0 = time.perf_counter()
    name, flags = MEMORY
    rec["runs"][name] = memory_estimate(flags, text=True)
    for name, lab, nproc, flags in SPEEDUP:
        rec["runs"][name] = {"command": f"dtlab run {lab} {' '.join(flags)}" if nproc == 1 else
                             f"dtlab run {lab} --nproc {nproc} {' '.join(flags)}",
                             "repeats": []}
    for i in range(a.repeats):
        for name, lab, nproc, flags in SPEEDUP:
            print(f"{name} {i + 1}/{a.repeats}", flush=True)
            rec["runs"][name]["repeats"].append(lab_one(name, lab, nproc, flags, work))
    for name, *_ in SPEEDUP:
        r = rec["runs"][name]
        steps = sorted(x["time"]["step_s_median"] for x in r["repeats"])
        r["step_s_median"] = steps[len(steps) // 2]
    one, two = rec["runs"]["one-process"], rec["runs"]["two-ranks"]
    rec["speedup"] = one["step_s_median"] / two["step_s_median"]
    write_record(a.json, rec, t0)
    print(f"wrote {a.json}: 1 process {one['step_s_median'] * 1e3:.1f} ms, 2 ranks "
          f"{two['step_s_median'] * 1e3:.1f} ms a step, {rec['speedup']:.2f}x "
          f"({rec['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
