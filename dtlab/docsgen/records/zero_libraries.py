"""The ZeRO libraries on the run the ZeRO lab's own table uses (small preset, 4 ranks, 5 steps):
FairScale OSS and ShardedDataParallel and torch FSDP2 through ``labs/zero.py``, and DeepSpeed's
stages 0-3 through ``labs/deepspeed_zero.py``; plus DeepSpeed stage 1 on ``tiny`` with 2 ranks,
once with the lab's config and once with DeepSpeed's default bucket all-reduce, for the bytes
that default costs. docs/zero.md and docs/deepspeed.md render their library tables from it.

    python -m dtlab.docsgen.records.zero_libraries --json docs/reference/zero-libraries.json

Each run is ``dtlab run LAB ...`` into its own folder (lab_runs.run_one); the record keeps what
the docs read of its summary.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dtlab.docsgen.records.lab_runs import new_record, run_one, write_record
from dtlab.report import records

ROOT = Path(__file__).resolve().parents[3]
SMALL = ["--preset", "small", "--steps", "5"]
# (name, lab, processes, flags); "{default_bucket}" is the config written into the work folder
RUNS = ([(f"zero-small-{impl}", "zero", 4, ["--impl", impl, *SMALL])
         for impl in ("fairscale-oss", "fairscale-sdp", "fsdp2")]
        + [(f"ds-small-zero{s}", "deepspeed_zero", 4, ["--config", f"ds_zero{s}", *SMALL])
           for s in range(4)]
        + [("ds-tiny-zero1", "deepspeed_zero", 2, ["--config", "ds_zero1", "--steps", "5"]),
           ("ds-tiny-zero1-bucket-allreduce", "deepspeed_zero", 2,
            ["--config", "{default_bucket}", "--steps", "5"])])


def default_bucket_config(work: Path) -> Path:
    """ds_zero1.json with DeepSpeed's own default, use_multi_rank_bucket_allreduce: true."""
    cfg = json.loads((ROOT / "launchers/configs/ds_zero1.json").read_text())
    cfg["zero_optimization"]["use_multi_rank_bucket_allreduce"] = True
    path = work / "ds_zero1_bucket_allreduce.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def make_parser():
    p = records.record_tool_parser("python -m dtlab.docsgen.records.zero_libraries",
                                   __doc__.splitlines()[0])
    p.add_argument("--work", default="runs/docs/zero-libraries", help="where the runs write")
    return p


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    work = Path(a.work)
    cfg = str(default_bucket_config(work))
    rec = new_record("the ZeRO libraries on the ZeRO lab's run "
                   "(python -m dtlab.docsgen.records.zero_libraries)")
    t0 = time.perf_counter()
    for i, (name, lab, nproc, flags) in enumerate(RUNS, 1):
        print(f"[{i}/{len(RUNS)}] {name}", flush=True)
        flags = [cfg if f == "{default_bucket}" else f for f in flags]
        rec["runs"][name] = run_one(name, lab, nproc, flags, work)
        if cfg in flags:  # the command as a reader would type it
            rec["runs"][name]["command"] = rec["runs"][name]["command"].replace(
                cfg, "ds_zero1.json with use_multi_rank_bucket_allreduce: true")
    write_record(a.json, rec, t0)
    print(f"wrote {a.json} ({len(RUNS)} runs, {rec['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
