"""``dtlab bench ddp``: our DDP against torch's on the same settings; the figure is the ratio of
median step times, measured in one session.

The variants take turns run by run (torch, ours over the ring, over the library's
all-reduce and over shared memory, then again), so a drift in the machine's load hits all of them
alike. Each round also measures the floor: the same per-rank work with nothing to communicate
(``nproc`` single-process runs at once, each on its share of the batch, one thread each as
under torchrun). No data-parallel implementation can beat it on this machine, so
``ratio_vs_torch["no-comm floor"]`` is the best ratio any of them could reach, and
``comm_overhead_removed`` says how much of torch DDP's time above the floor each variant saved.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from dtlab.errors import UsageError
from dtlab.train.model import PRESETS
from dtlab.measure.run_record import atomic_write_text, read_summary
from dtlab.launch.launcher import get_lab, launch, validate

VARIANTS = {"torch": ["--impl", "torch"],
            "own-ring": ["--impl", "own", "--allreduce", "ring"],
            "own-library": ["--impl", "own", "--allreduce", "library"],
            "own-shm": ["--impl", "own", "--allreduce", "shm"]}


FLOOR = "no-comm floor"


def floor_step(nproc: int, common: list[str], preset: str, out: Path) -> float:
    """Median step of ``nproc`` concurrent single-process runs, each on 1/nproc of the batch:
    what a rank's step costs when the gradients need no all-reduce."""
    per = PRESETS[preset]["batch_size"] // nproc
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = []
    for k in range(nproc):
        (out / f"rank{k}").mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "labs.ddp", "--impl", "own", *common,
                "--batch-size", str(per), "--out", str(out / f"rank{k}")]
        log = open(out / f"rank{k}" / "run.log", "w")
        procs.append((subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT),
                      log))
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            raise UsageError(f"the no-communication floor run failed ({rc}); see "
                             f"{out}/rank*/run.log")
    return statistics.median(read_summary(out / f"rank{k}")["time"]["step_s_median"]
                             for k in range(nproc))


def bench_ddp(nproc: int, preset: str, steps: int, repeats: int, out: str,
              variants: str = "all") -> int:
    if repeats < 1 or steps < 1:
        raise UsageError("--repeats and --steps must be >= 1")
    chosen = list(VARIANTS) if variants == "all" else \
        ["torch", *(v.strip() for v in variants.split(",") if v.strip() and v.strip() != "torch")]
    bad = [v for v in chosen if v not in VARIANTS]
    if bad:
        raise UsageError(f"--variants: unknown {', '.join(bad)}; choose from "
                         f"{', '.join(VARIANTS)}")
    lab = get_lab("ddp")
    common = ["--preset", preset, "--steps", str(steps), "--no-baseline"]
    out = Path(out)
    runs = {v: [] for v in [*chosen, FLOOR]}
    for i in range(repeats):
        for v in chosen:
            flags = VARIANTS[v]
            run_out = out / f"{v}-{i}"
            lab_args = [*flags, *common, "--out", str(run_out)]
            validate(lab, nproc, lab_args)
            print(f"[{i + 1}/{repeats}] ddp {v} on {nproc} processes ...", flush=True)
            rc = launch(lab, nproc, lab_args, log=run_out / "run.log")
            if rc != 0:
                raise UsageError(f"ddp {v} failed (exit {rc}); see {run_out / 'run.log'}")
            runs[v].append(read_summary(run_out)["time"]["step_s_median"])
        if nproc > 1:
            print(f"[{i + 1}/{repeats}] the same work without communication ({nproc} single "
                  "processes) ...", flush=True)
            runs[FLOOR].append(floor_step(nproc, common, preset, out / f"floor-{i}"))
    med = {v: statistics.median(ts) for v, ts in runs.items() if ts}
    over = med["torch"] - med.get(FLOOR, med["torch"])
    result = {"preset": preset, "nproc": nproc, "steps": steps, "repeats": repeats,
              "step_s_median": med, "step_s_runs": runs,
              "ratio_vs_torch": {v: med[v] / med["torch"] for v in med},
              "comm_overhead_removed": {v: (med["torch"] - med[v]) / over for v in chosen}
              if FLOOR in med and over > 0 else None}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=1) + "\n")
    for v in med:
        print(f"  ddp {v:<14} median step {med[v] * 1e3:8.2f} ms   "
              f"{result['ratio_vs_torch'][v]:.2f}x torch DDP")
    print(f"record: {out / 'summary.json'}")
    return 0
