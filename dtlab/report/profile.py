"""``dtlab profile LAB`` and ``dtlab profile compare``: any lab under the profiler of the shared
loop (dtlab/measure/profiler.py), a table of computation, communication, overlap and exposed
communication per rank, and the same for several strategies side by side.

Traces go to ``OUT/tb``; ``tensorboard --logdir OUT/tb`` with torch-tb-profiler shows them,
distributed view included.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from dtlab.measure.run_record import atomic_write_text, read_summary
from dtlab.report import tables as report
from dtlab.launch.launcher import get_lab, opt_value, run_one, without_opt


def print_summary(summary: dict) -> None:
    rows = summary["extra"].get("profile") or []
    t = Table(title=escape(f"dtlab profile: {summary['lab']} [{summary['variant']}], ")
                + f"{summary['world_size']} rank(s), per step (ms and share of the step)")
    for c in ("rank", "step", "computation", "communication", "overlap", "exposed comm",
              "other"):
        t.add_column(c, justify="right")
    for rank, r in enumerate(rows):
        if r is None:
            continue
        us, sh = r["us_per_step"], r["share_of_step"]
        cell = lambda k: f"{us[k] / 1e3:.2f} ({sh[k]:.0%})"  # noqa: E731
        t.add_row(str(rank), f"{us['step'] / 1e3:.2f}", cell("computation"),
                  cell("communication"), cell("overlap"), cell("exposed_communication"),
                  cell("other"))
    console = report.console(160)
    console.print(t)


PROFILE_COMPARE = [  # (name, lab, flags): the strategies whose time split is compared
    ("ddp torch", "ddp", ["--impl", "torch"]),
    ("ddp own (ring, 20 KiB buckets)", "ddp", ["--impl", "own", "--bucket-mb", "0.02"]),
    ("zero stage 1", "zero", ["--stage", "1"]),
    ("zero stage 2", "zero", ["--stage", "2"]),
    ("zero stage 3", "zero", ["--stage", "3"]),
    ("fsdp2", "zero", ["--impl", "fsdp2"]),
    ("tensor parallel", "tensor_parallel", []),
    ("pipeline 1f1b", "pipeline", ["--schedule", "1f1b"]),
]


def profile_one(lab: str, nproc: int | None, lab_args: list[str], nnodes: int = 1,
                cluster: str = "main") -> int:
    """``dtlab profile LAB``: ``dtlab run`` with the loop's profiler on (``--profile-dir``,
    default 8 steps), then the time split per rank."""
    nproc = (get_lab(lab).tour_nproc if nnodes == 1 else 1) if nproc is None else nproc
    out = Path(opt_value(lab_args, "--out") or f"runs/profile/{lab}-n{nproc}x{nnodes}")
    lab_args = [*without_opt(lab_args, "--out"), "--out", str(out), "--profile-dir", str(out)]
    if opt_value(lab_args, "--steps") is None:
        lab_args += ["--steps", "8"]
    shutil.rmtree(out / "tb", ignore_errors=True)
    rc = run_one(lab, nproc, lab_args, nnodes=nnodes, cluster=cluster)
    if (out / "summary.json").is_file():
        print_summary(read_summary(out))
        print(f"traces: {out / 'tb'}  (tensorboard --logdir {out / 'tb'}, with torch-tb-profiler)")
    return rc


def compare(nproc: int | None, lab_args: list[str], nnodes: int = 1,
            cluster: str = "main") -> int:
    """``dtlab profile compare``: every strategy of PROFILE_COMPARE profiled alike; one table of
    shares, mean over ranks, in OUT/compare.md and OUT/compare.json."""
    out = Path(opt_value(lab_args, "--out") or "runs/profile")
    extra = without_opt(lab_args, "--out")
    rows = []
    for name, lab, flags in PROFILE_COMPARE:
        run_dir = out / name.split(" (")[0].replace(" ", "-")
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            rc = profile_one(lab, nproc or (2 if nnodes == 1 else 1),
                             [*flags, *extra, "--out", str(run_dir)], nnodes, cluster)
        f = run_dir / "summary.json"
        if rc != 0 or not f.is_file():
            print(f"dtlab: profiling {name} failed (exit {rc})", file=sys.stderr)
            return rc or 1
        s = json.loads(f.read_text())
        shares = [r["share_of_step"] for r in s["extra"]["profile"]]
        mean = {k: sum(x[k] for x in shares) / len(shares) for k in shares[0]}
        rows.append({"strategy": name, "world_size": s["world_size"],
                     "step_ms": s["extra"]["profile"][0]["us_per_step"]["step"] / 1e3,
                     "comm_bytes_per_step": s["comm"]["bytes_per_step"], **mean})
        print(f"  {name:<32} ok  comm {mean['communication']:.0%}  exposed "
              f"{mean['exposed_communication']:.0%}", flush=True)
    atomic_write_text(out / "compare.json", json.dumps({"rows": rows}, indent=1) + "\n")
    head = ("strategy", "ranks", "step ms", "comm/step/rank", "computation", "communication",
            "overlap", "exposed comm", "other")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["strategy"], str(r["world_size"]), f"{r['step_ms']:.1f}",
            report.human_bytes(r["comm_bytes_per_step"])] + [f"{r[k]:.0%}" for k in (
                "computation", "communication", "overlap", "exposed_communication", "other")])
            + " |")
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"(shares of a profiled step, mean over ranks; {out / 'compare.json'})")
    return 0
