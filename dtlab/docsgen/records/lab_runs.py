"""The lab runs docs/ quotes beyond the tour, as one record: the pipeline's bubble over a grid of
stages and micro-batches (and its two schedule pictures from the same runs), our DDP's overlap
timing, every world size and all-reduce of our DDP, and the small preset.

    python -m dtlab.docsgen.records.lab_runs --json docs/reference/labs.json --img docs/img

Each run is ``dtlab run LAB ...`` into its own folder; the record keeps what the docs read of its
summary (distance from the baseline, step time, bytes, memory, extra).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from dtlab.launch import sessions
from dtlab.measure.run_record import atomic_write_text
from dtlab.report import pipeline_schedule, records

# (name, lab, processes, flags): what the docs quote, and nothing else
PIPELINE = [(f"pipeline-{s}-p{p}-m{m}", "pipeline", p,
             ["--preset", "tiny" if p == 2 else "small", "--schedule", s, "--microbatches",
              str(m), "--steps", "3", "--stage-compute-ms", "20"])
            for p in (2, 4) for m in (1, 2, 4, 8) for s in ("gpipe", "1f1b")]
DDP = ([(f"ddp-overlap-{a}-{'yes' if o else 'no'}", "ddp", 2,
         ["--impl", "own", "--allreduce", a, "--preset", "small", "--steps", "30",
          "--bucket-mb", "1", *([] if o else ["--no-overlap"])])
        for a in ("ring", "library") for o in (True, False)]
       + [(f"ddp-own-w{w}-{a}", "ddp", w, ["--impl", "own", "--allreduce", a, "--batch-size",
                                            "24", "--steps", "20"])
          for w in (2, 3, 4) for a in ("ring", "library")]
       + [("ddp-torch-w2-batch24", "ddp", 2, ["--batch-size", "24", "--steps", "20"]),
          ("ddp-torch-w4", "ddp", 4, ["--steps", "20"]),
          ("ddp-torch-small", "ddp", 2, ["--preset", "small", "--steps", "20"]),
          ("baseline-small", "baseline", 1, ["--preset", "small", "--steps", "20"])])
OTHERS = ([("mp-w4", "torch_multiprocessing", 1, ["--workers", "4", "--steps", "20"]),
           ("dp-r4", "dataparallel", 1, ["--replicas", "4", "--steps", "20"]),
           ("accelerate-bf16", "accelerate_lab", 2, ["--mixed-precision", "bf16", "--steps", "6"]),
           ("accelerate-fp16", "accelerate_lab", 2, ["--mixed-precision", "fp16", "--steps", "6"]),
           ("accelerate-accum2", "accelerate_lab", 2, ["--steps", "4", "--accum", "2"])]
          + [(f"zero-small-s{s}-{o}", "zero", 4, ["--preset", "small", "--stage", str(s),
                                                  "--steps", "5", "--offload", o])
             for s, o in ((0, "none"), (1, "none"), (2, "none"), (3, "none"), (1, "optimizer"),
                          (2, "optimizer"), (3, "optimizer"), (3, "param"))])
RUNS = PIPELINE + DDP + OTHERS
PICTURES = {"pipeline-gpipe-p4-m8": "pipeline-gpipe-p4-m8.png",
            "pipeline-1f1b-p4-m8": "pipeline-1f1b-p4-m8.png"}
KEEP = ("lab", "variant", "world_size", "preset", "steps", "batch_size", "n_params", "baseline",
        "time", "comm", "memory", "extra", "ok")


def run_one(name: str, lab: str, nproc: int, flags: list[str], work: Path, *,
            exits=(0,), keep=KEEP, env=None, timeout=900) -> dict:
    """``dtlab run LAB --nproc N FLAGS`` into ``work/name``: the parts ``keep`` of its summary,
    the command as a reader types it and its exit status (one of ``exits``, else the record
    tool stops with the run's error)."""
    out = work / name
    cmd = [sys.executable, "-m", "dtlab", "run", lab, "--nproc", str(nproc), "--out", str(out),
           *flags]
    p = sessions.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode not in exits or not (out / "summary.json").is_file():
        raise SystemExit(f"{name} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    s = {k: s[k] for k in keep if k in s}
    if "extra" in s:
        s["extra"].pop("profile", None)
    if lab == "pipeline" and "extra" in s:  # figures from its timelines (kept in the run folder)
        s["extra"].update(pipeline_schedule.figures(s["extra"]))
        del s["extra"]["timelines"], s["extra"]["actions"]
    s["command"] = f"dtlab run {lab} --nproc {nproc} {' '.join(flags)}"
    s["exit_status"] = p.returncode
    return s


def new_record(what: str) -> dict:
    """A record's head, as every record tool here writes it: what it is, when, on what machine."""
    return {"what": what, "date": time.strftime("%Y-%m-%d"), "machine": records.machine(),
            "runs": {}}


def write_record(path, rec: dict, t0: float) -> None:
    """The record, with the seconds since ``t0`` it took, written whole or not at all."""
    rec["wall_s"] = time.perf_counter() - t0
    atomic_write_text(Path(path), json.dumps(rec, indent=1) + "\n")


def memory_estimate(flags: list[str], text: bool = False) -> dict:
    """``dtlab memory FLAGS --json`` as a record entry (and, with ``text``, the table it prints)."""
    import os
    base = [sys.executable, "-m", "dtlab", "memory", *flags]
    p = sessions.run([*base, "--json"], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"dtlab memory {' '.join(flags)} failed:\n{p.stderr[-2000:]}")
    entry = {"command": f"dtlab memory {' '.join(flags)}"}
    if text:
        t = sessions.run(base, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, COLUMNS="160"))
        entry["text"] = t.stdout
    return {**entry, **json.loads(p.stdout)}


def make_parser():
    p = records.record_tool_parser("python -m dtlab.docsgen.records.lab_runs", __doc__.splitlines()[0])
    p.add_argument("--work", default="runs/docs/labs", help="where the runs write")
    return p


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    work = Path(a.work)
    rec = new_record("the lab runs docs quote beyond the tour (python -m dtlab.docsgen.records.lab_runs)")
    t0 = time.perf_counter()
    for i, (name, lab, nproc, flags) in enumerate(RUNS, 1):
        print(f"[{i}/{len(RUNS)}] {name}", flush=True)
        rec["runs"][name] = run_one(name, lab, nproc, flags, work)
    write_record(a.json, rec, t0)
    if a.img:
        for name, png in PICTURES.items():
            shutil.copyfile(work / name / "schedule.png", Path(a.img) / png)
    print(f"wrote {a.json} ({len(RUNS)} runs, {rec['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
