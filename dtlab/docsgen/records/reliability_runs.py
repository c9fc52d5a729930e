"""The checkpoint records docs/reliability.md quotes: resharding (written at one layout, resumed
at another) and a killed rank that torchrun restarts from the last checkpoint.

    python -m dtlab.docsgen.records.reliability_runs --json docs/reference/resharding.json \
        --restart-json docs/reference/reliability-restart.json

Every command is a ``dtlab run``; the record keeps it (with the folders as a reader would type
them), the resumed run's distance from the baseline and the checkpoint writes' times.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from dtlab.launch import sessions
from dtlab.measure.run_record import atomic_write_text
from dtlab.report import records

# (written by, resumed by): layouts as `dtlab run` flags
RESHARD = [("zero --stage 3 --nproc 2", "zero --stage 3 --nproc 4"),
           ("ddp --nproc 2", "ddp --nproc 4"),
           ("zero --stage 1 --nproc 4", "zero --stage 1 --nproc 2"),
           ("tensor_parallel --nproc 2", "ddp --nproc 2"),
           ("pipeline --nproc 2", "parallel3d --dp 1 --pp 2 --tp 2 --nproc 4"),
           ("zero --stage 3 --nproc 2", "zero --stage 3 --nproc 2")]
RESTART = ("zero --stage 3 --nproc 2 --preset small --steps 20 --ckpt-dir ck --ckpt-every 5 "
           "--fail-at-step 12 --fail-rank 1 --max-restarts 1")


def _run(flags: str, work: Path) -> tuple[int, float]:
    """``dtlab run FLAGS`` in the folder ``work`` (the flags' folders are relative to it): exit
    status and wall seconds."""
    t0 = time.perf_counter()
    p = sessions.run([sys.executable, "-m", "dtlab", "run", *shlex.split(flags)], cwd=work,
                     capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        print(p.stdout[-2000:] + p.stderr[-2000:], file=sys.stderr)
    return p.returncode, time.perf_counter() - t0


def _writes(out: Path) -> list[float]:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return [s["ckpt_s"] for s in steps if s.get("ckpt_s")]


def resharding(work: Path) -> list[dict]:
    rows = []
    for i, (written, resumed) in enumerate(RESHARD):
        case = work / f"reshard-{i}"
        case.mkdir(parents=True, exist_ok=True)
        first = f"{written} --steps 10 --ckpt-dir runs/ck --ckpt-every 5 --out runs/first " \
                "--no-baseline"
        second = f"{resumed} --steps 20 --ckpt-dir runs/ck --ckpt-every 5 --out runs/resumed"
        for flags in (first, second):
            rc, _ = _run(flags, case)
            if rc != 0:
                raise SystemExit(f"reliabref: `dtlab run {flags}` failed (exit {rc})")
        s = json.loads((case / "runs/resumed/summary.json").read_text())
        ck = s["extra"]["checkpoint"]
        rows.append({"written": f"dtlab run {first}", "resumed": f"dtlab run {second}",
                     "resumed_from": ck["resumed_from"], "resharded": ck.get("resharded"),
                     "max_rel_loss_diff": s["baseline"]["max_rel_loss_diff"],
                     "max_abs_param_diff": s["baseline"]["max_abs_param_diff"],
                     "ok": s["ok"],  # the resumed run's steps hold the whole history
                     "ckpt_write_s": _writes(case / "runs/resumed")})
        print(f"  {written} -> {resumed}: {rows[-1]['max_rel_loss_diff']:.1e}", flush=True)
    return rows


def restart(work: Path) -> dict:
    case = work / "restart"
    case.mkdir(parents=True, exist_ok=True)
    rc, wall = _run(f"{RESTART} --out run", case)
    s = json.loads((case / "run/summary.json").read_text())
    last = sorted((case / "ck").glob("step-*"))[-1]
    return {"command": f"dtlab run {RESTART}", "date": time.strftime("%Y-%m-%d"),
            "machine": records.machine(), "wall_s_with_restart": round(wall, 2),
            "exit_status": rc, "checkpoint": s["extra"]["checkpoint"],
            "max_rel_loss_diff": s["baseline"]["max_rel_loss_diff"],
            "max_abs_param_diff": s["baseline"]["max_abs_param_diff"],
            "step_s_median": s["time"]["step_s_median"], "ckpt_write_s": _writes(case / "run"),
            "checkpoint_bytes": {f.name: f.stat().st_size for f in sorted(last.iterdir())
                                 if f.name != "manifest.json"}}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dtlab.docsgen.records.reliability_runs",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="the resharding record")
    p.add_argument("--restart-json", required=True, help="the restart record")
    p.add_argument("--work", default="runs/docs/reliability", help="where the runs write")
    return p


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    work = Path(a.work).resolve()
    if work.exists():
        shutil.rmtree(work)  # a checkpoint left from an earlier refresh would be resumed
    rows = resharding(work)
    atomic_write_text(Path(a.json), json.dumps(
        {"what": "a checkpoint written at one layout, resumed at another (10 steps written, "
                 "resumed to 20)", "machine": records.machine(), "date": time.strftime("%Y-%m-%d"),
         "rows": rows}, indent=1) + "\n")
    rec = restart(work)
    atomic_write_text(Path(a.restart_json), json.dumps(rec, indent=1) + "\n")
    print(f"wrote {a.json} and {a.restart_json}")
    return 0 if all(r["ok"] for r in rows) and rec["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
