"""``dtlab debug hang RUN_DIR``: ask every rank of a run for its flight record and stacks, and say
which rank is behind, what each one is blocked in, and where the ranks' collectives differ
(dtlab/reliability/flight.py; docs/debugging.md). On a run that has ended it reads what the ranks left
in their ring files.

    dtlab debug hang runs/ddp-n2            # the --out folder of the run
"""
from __future__ import annotations

import json

from dtlab.reliability import flight
from dtlab.errors import UsageError
from dtlab.measure.run_record import atomic_write_text


def hang(run_dir: str, wait_s: float = 10.0) -> int:
    if not 0 < wait_s <= 600:
        raise UsageError(f"--wait {wait_s:g}: give seconds between 0 and 600")
    if not flight.flight_dir(run_dir).is_dir():
        raise UsageError(f"{run_dir}: no flight/ folder; give the --out folder of a "
                         "multi-process run (a single process has no collectives to record)")
    world = flight.live_world(run_dir)
    if world < 1:
        raise UsageError(f"{run_dir}/flight holds no ring files yet; the ranks write them when "
                         "the training loop starts: try again in a few seconds")
    alive = [flight.alive(h["host"], h["pid"]) for h, _ in flight.rings(run_dir).values()]
    if alive and not any(alive) and None not in alive:
        print(f"the run in {run_dir} has ended: reading what its {world} rank(s) left",
              flush=True)
        dumps = flight.postmortem(run_dir)
    else:
        since = flight.request_dumps(run_dir)
        print(f"asked {world} rank(s) of {run_dir} for their flight records (waiting up to "
              f"{wait_s:g} s) ...", flush=True)
        dumps = flight.collect(run_dir, world, since, wait_s)
    rep = flight.desync_report(dumps, world)
    for line in flight.describe_report(rep):
        print(line)
    for r, d in sorted(dumps.items()):
        last = d["entries"][-1] if d["entries"] else None
        print(f"  rank {r} on {d['host']} (pid {d['pid']}): step {d['step']}, last op "
              + (f"#{last['seq']} {last['op']} {last['bytes']} B ({last['site']})" if last
                 else "none"))
    out = flight.flight_dir(run_dir) / "report.json"
    atomic_write_text(out, json.dumps(rep, indent=1, default=str) + "\n")
    print(f"records and stacks: {flight.flight_dir(run_dir)}  report: {out}")
    return 1 if rep["missing"] or rep["behind"] or rep["mismatches"] else 0
