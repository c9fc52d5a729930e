"""``dtlab bench hang``: inject a fault into a real run, again and again, and measure whether the
desync report (dtlab/reliability/flight.py) names the right rank and op, and how long after the fault
it is printed.

    dtlab bench hang --runs 10 --faults stall,mismatch,link --cluster main \\
        --json docs/reference/hang.json

    stall     rank 1 stops answering at step 2: the report must name rank 1 as behind and
              blocked in the stall; limit: the collective timeout + 5 s after the stall
    mismatch  rank 1 issues an extra all_reduce at step 2 (gloo aborts the rank that receives
              the odd size): the report must name the mismatch and rank 1's 28-byte op;
              limit: timeout + 5 s after the injection
    link      2 nodes of the namespace cluster, 1 rank each; node 2's link is pulled after
              step 1: the report must name rank 1 as the silent one and say that every rank
              waits in the same op (the transport failed, not the program); limit: timeout +
              5 s after the pull. Needs root and ``dtlab cluster up``.

Detection time is measured from the fault (the injected rank's own line, or the moment the link
is pulled) to the first line of the report on the launcher's output.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from dtlab.cluster.netns import Cluster, set_link
from dtlab.errors import UsageError
from dtlab.launch.sessions import Job
from dtlab.measure.run_record import atomic_write_text
from dtlab.report import tables as report
from dtlab.report import records

FAULTS = ("stall", "mismatch", "link")
LINK_STEPS = 3000
MARGIN_S = 5.0


def _lines(proc, sink: list) -> None:
    for line in proc.stdout:
        sink.append((time.time(), line.rstrip("\n")))


def one_run(fault: str, out: Path, timeout_s: float, cluster: str) -> dict:
    # a link is pulled from outside while the run goes on: a tiny step takes ~10 ms, so give it
    # steps enough to be still running then (it never reaches them)
    steps = LINK_STEPS if fault == "link" else 8
    args = [sys.executable, "-m", "dtlab", "run", "ddp", "--steps", str(steps), "--log-every",
            "1", "--timeout", f"{timeout_s:g}", "--out", str(out)]
    if fault == "link":
        args += ["--nnodes", "2", "--nproc", "1", "--cluster", cluster]
    else:
        args += ["--nproc", "2", f"--{fault}-at-step", "2", f"--{fault}-rank", "1"]
    lines: list = []
    job = Job()  # the run, its node agents and its ranks (each in a session of its own)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job.env(), start_new_session=True)
    reader = threading.Thread(target=_lines, args=(proc, lines), daemon=True)
    reader.start()
    t_fault, pulled = None, False
    deadline = time.time() + 10 * timeout_s + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            if fault == "link" and not pulled and any("step    1 " in ln for _, ln in lines):
                t_fault = time.time()
                set_link(cluster, _node_name(cluster, 2), "down")
                pulled = True
            time.sleep(0.05)
    finally:  # past the deadline, or stopped: nothing of the run is left behind
        job.stop()
        proc.wait()
        reader.join(timeout=10)
        if pulled:
            set_link(cluster, _node_name(cluster, 2), "up")
    if fault != "link":
        t_fault = next((t for t, ln in lines if "injected" in ln), None)
    t_report = next((t for t, ln in lines if ln.startswith("dtlab:   ")), None)
    rep = _report(out)
    return {"fault": fault, "rc": proc.returncode, "correct": _correct(fault, rep, out),
            "detect_s": round(t_report - t_fault, 2) if t_fault and t_report else None,
            "report": [ln for _, ln in lines if ln.startswith("dtlab:")][:8]}


def _node_name(cluster: str, i: int) -> str:
    return Cluster.load(cluster).node_name(i)


def _report(out: Path) -> dict | None:
    summary = out / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if "desync" in s.get("failure", {}):
            return dict(s["failure"]["desync"], failure=s["failure"])
    f = out / "flight" / "report.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _correct(fault: str, rep: dict | None, out: Path) -> bool:
    if rep is None:
        return False
    if fault == "stall":
        return [b["rank"] for b in rep["behind"]] == [1] and \
            (rep["ranks"].get("1", {}).get("blocked_in") or {}).get("op") == "stall"
    if fault == "mismatch":
        m = rep["mismatches"]
        return bool(m) and m[0]["ops"]["1"]["bytes"] == 28 and m[0]["ops"]["0"]["bytes"] != 28
    silent = (rep.get("failure") or {}).get("silent_ranks")
    return bool(rep.get("transport_failed")) and silent == [1]


def run(json_path: str, runs: int, faults: str, timeout_s: float, cluster: str,
        work: str) -> int:
    chosen = [f.strip() for f in faults.split(",") if f.strip()]
    bad = [f for f in chosen if f not in FAULTS]
    if bad or not chosen:
        raise UsageError(f"--faults {faults!r}: choose from {', '.join(FAULTS)}")
    if not 1 <= runs <= 100:
        raise UsageError(f"--runs {runs}: give 1..100")
    if not 1 <= timeout_s <= 120:
        raise UsageError(f"--timeout {timeout_s:g}: give 1..120 seconds")
    if "link" in chosen:
        Cluster.load(cluster)  # a clear error when it is not up
    record = {"what": "desync report against injected faults (dtlab bench hang)",
              "command": f"dtlab bench hang --runs {runs} --faults {','.join(chosen)} "
                         f"--timeout {timeout_s:g} --cluster {cluster}",
              "date": time.strftime("%Y-%m-%d"),
              "machine": records.machine(),
              "timeout_s": timeout_s, "limit_s": timeout_s + MARGIN_S, "faults": {}}
    for fault in chosen:
        rows = []
        for i in range(runs):
            r = one_run(fault, Path(work) / f"{fault}-{i}", timeout_s, cluster)
            rows.append(r)
            print(f"{fault} {i + 1}/{runs}: {'right' if r['correct'] else 'WRONG'}, detected "
                  f"after {r['detect_s']} s", flush=True)
        times = [r["detect_s"] for r in rows if r["detect_s"] is not None]
        record["faults"][fault] = {
            "runs": runs, "correct": sum(r["correct"] for r in rows),
            "within_limit": sum(t <= timeout_s + MARGIN_S for t in times),
            "detect_s_max": max(times) if times else None,
            "detect_s_median": sorted(times)[len(times) // 2] if times else None,
            "rows": rows}
    atomic_write_text(Path(json_path), json.dumps(record, indent=1) + "\n")
    for fault, f in record["faults"].items():
        print(f"{fault:<9} right {f['correct']}/{f['runs']}, within {record['limit_s']:g} s "
              f"{f['within_limit']}/{f['runs']}, detection median {f['detect_s_median']} s, "
              f"max {f['detect_s_max']} s")
    print(f"record: {json_path}")
    ok = all(f["correct"] == f["runs"] == f["within_limit"] for f in record["faults"].values())
    return 0 if ok else 1
