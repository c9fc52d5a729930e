"""``dtlab debug hang RUN_DIR``: ask every rank of a run for its flight record and stacks, and say
which rank is behind, what each one is blocked in, and where the ranks' collectives differ
(dtlab/reliability/flight.py; docs/debugging.md). On a run that has ended it reads what the ranks left
in their ring files. It exits 1 when it finds a hang or a failed rank (one behind, a collective
mismatch, every rank waiting in the same op, a rank that did not answer or died) and 0 only when
it finds none.

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
    status, says = verdict(rep)
    print(says)
    return status


def verdict(rep: dict) -> tuple[int, str]:
    """The exit status of ``dtlab debug hang`` and the sentence that says why: 1 for every hang
    or failed rank the report shows, 0 only when there is none."""
    why = [f"rank {r} left no record" for r in rep["missing"]]
    why += [f"rank {b['rank']} is behind in group {flight._g(b['group'])}" for b in rep["behind"]]
    why += [f"collective mismatch at op #{m['seq']} of group {flight._g(m['group'])}"
            for m in rep["mismatches"]]
    same = rep.get("same_op")
    if same:
        why.append(f"every rank waits in {same['op']} #{same['seq']} of group "
                   f"{flight._g(same['group'])}")
    for r, info in rep["ranks"].items():
        failed = (info.get("blocked_in") or {}).get("failed")
        if info.get("fatal") or failed:
            why.append(f"rank {r} died" if info.get("fatal") else f"rank {r} failed: {failed}")
        elif info.get("answered") is False:  # alive or not, a rank that cannot answer is stuck
            state = {True: "alive", False: "its process is gone",
                     None: "on another machine"}[info.get("alive")]
            why.append(f"rank {r} did not answer ({state})")
    if why:
        return 1, "a hang: " + "; ".join(why)
    if all(info.get("answered") for info in rep["ranks"].values()):
        return 0, "no hang found: every rank answered and the ranks agree"
    return 0, "no hang found: the ranks' records agree"
