"""``dtlab bench ddp``: our DDP against torch's on the same settings; the figure is the ratio of
median step times, measured in one session.

The variants take turns run by run (torch, ours over the ring, over the library's
all-reduce and over shared memory, then again), so a drift in the machine's load hits all of them alike.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from dtlab.core.errors import UsageError
from dtlab.core.record import atomic_write_text, read_summary
from dtlab.tools.launch import get_lab, launch, validate

VARIANTS = {"torch": ["--impl", "torch"],
            "own-ring": ["--impl", "own", "--allreduce", "ring"],
            "own-library": ["--impl", "own", "--allreduce", "library"],
            "own-shm": ["--impl", "own", "--allreduce", "shm"]}


def bench_ddp(nproc: int, preset: str, steps: int, repeats: int, out: str) -> int:
    if repeats < 1 or steps < 1:
        raise UsageError("--repeats and --steps must be >= 1")
    lab = get_lab("ddp")
    common = ["--preset", preset, "--steps", str(steps), "--no-baseline"]
    out = Path(out)
    runs = {v: [] for v in VARIANTS}
    for i in range(repeats):
        for v, flags in VARIANTS.items():
            run_out = out / f"{v}-{i}"
            lab_args = [*flags, *common, "--out", str(run_out)]
            validate(lab, nproc, lab_args)
            print(f"[{i + 1}/{repeats}] ddp {v} on {nproc} processes ...", flush=True)
            rc = launch(lab, nproc, lab_args, log=run_out / "run.log")
            if rc != 0:
                raise UsageError(f"ddp {v} failed (exit {rc}); see {run_out / 'run.log'}")
            runs[v].append(read_summary(run_out)["time"]["step_s_median"])
    med = {v: statistics.median(ts) for v, ts in runs.items()}
    result = {"preset": preset, "nproc": nproc, "steps": steps, "repeats": repeats,
              "step_s_median": med, "step_s_runs": runs,
              "ratio_vs_torch": {v: med[v] / med["torch"] for v in VARIANTS}}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=1) + "\n")
    for v in VARIANTS:
        print(f"  ddp {v:<12} median step {med[v] * 1e3:8.2f} ms   "
              f"{result['ratio_vs_torch'][v]:.2f}x torch DDP")
    print(f"record: {out / 'summary.json'}")
    return 0
