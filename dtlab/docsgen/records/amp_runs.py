"""The mixed-precision runs docs/amp.md quotes: fp16 with and without loss scaling, bf16 and the
pure fp16 model with fp32 master weights, each 50 steps of the tiny preset in one process,
compared with the fp32 baseline.

    python -m dtlab.docsgen.records.amp_runs --json docs/reference/amp.json

Each run is ``dtlab run amp ...`` into its own folder; the record keeps what the page reads of
its summary (distance from the baseline, memory, the scale history, the fp16 underflow count).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dtlab.docsgen.records.lab_runs import new_record, run_one, write_record

STEPS = "50"
# (name, lab, processes, flags): one row of the page's table each
RUNS = [("amp-fp16-own", "amp", 1, ["--dtype", "fp16", "--scaler", "own", "--steps", STEPS]),
        ("amp-fp16-none", "amp", 1, ["--dtype", "fp16", "--scaler", "none", "--steps", STEPS]),
        ("amp-bf16-none", "amp", 1, ["--dtype", "bf16", "--scaler", "none", "--steps", STEPS]),
        ("amp-fp16-master", "amp", 1, ["--dtype", "fp16", "--master-weights", "--steps", STEPS])]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dtlab.docsgen.records.amp_runs",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the record")
    p.add_argument("--work", default="runs/docs/amp", help="where the runs write")
    return p


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    work = Path(a.work)
    rec = new_record("the mixed-precision runs docs/amp.md quotes "
                   "(python -m dtlab.docsgen.records.amp_runs)")
    t0 = time.perf_counter()
    for i, (name, lab, nproc, flags) in enumerate(RUNS, 1):
        print(f"[{i}/{len(RUNS)}] {name}", flush=True)
        # a run outside its tolerance (exit 1: fp16 without loss scaling) is a row too
        rec["runs"][name] = run_one(name, lab, nproc, flags, work, exits=(0, 1))
    write_record(a.json, rec, t0)
    print(f"wrote {a.json} ({len(RUNS)} runs, {rec['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
