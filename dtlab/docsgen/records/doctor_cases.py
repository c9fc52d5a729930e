"""The doctor's verdicts on a healthy and four broken namespace clusters, recorded for the docs.

    sudo python -m dtlab.docsgen.records.doctor_cases --json docs/reference/doctor-collective.json

Brings up a 3-node cluster ``doc`` (200mbit links; doc2 names its interface ens5; doc3 has
Docker's 64 MiB /dev/shm), runs ``dtlab doctor --collective`` for each case the tests assert
(tests/test_cluster.py), keeps every non-ok finding and the collective result, and takes the
cluster down again. The same faults as the tests, so docs/doctor.md quotes real output.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtlab.launch import sessions
from dtlab.report import records

NAME, SUBNET, MASTER = "doc", "10.84.0.0/24", "10.84.0.11"
PORT = "29611"  # below the ephemeral range, so the `ports` case blocks gloo's ports only


def _dtlab(*argv, cwd=None, env=None) -> subprocess.CompletedProcess:
    return sessions.run([sys.executable, "-m", "dtlab", *map(str, argv)], capture_output=True,
                        text=True, cwd=cwd, env=dict(os.environ, **(env or {})), timeout=600)


def _doctor(work: Path, hosts: list[str], *extra, env=None, slots=1) -> dict:
    hf = work / "hostfile"
    hf.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    argv = ["doctor", "--hostfile", "hostfile", "--master-addr", MASTER, "--master-port", PORT,
            "--collective", "--collective-timeout", "5", *extra]
    t0 = time.monotonic()
    p = _dtlab(*argv, "--json", cwd=work, env=env)
    r = json.loads(p.stdout)
    return {"command": "dtlab " + " ".join(map(str, argv)), "hostfile": hf.read_text(),
            "exit_status": p.returncode, "seconds": round(time.monotonic() - t0, 1),
            "findings": [f for f in r["findings"] if f["severity"] != "ok"],
            "collective": {k: v for k, v in (r.get("collective") or {}).items()
                           if k != "launcher_tail"}}


def record() -> dict:
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases["healthy"] = _doctor(work, ["doc1", "doc2"])
        (work / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=eth0\n")
        cases["interface missing on doc2"] = _doctor(work, ["doc1", "doc2"])
        (work / ".deepspeed_env").unlink()
        _dtlab("cluster", "link", "--name", NAME, "doc2", "down")
        try:
            cases["link of doc2 down"] = _doctor(work, ["doc1", "doc2"])
        finally:
            _dtlab("cluster", "link", "--name", NAME, "doc2", "up")
        _dtlab("cluster", "firewall", "--name", NAME, "doc1", "--block", "32768-60999")
        try:
            cases["doc1 drops connections to its ephemeral ports"] = _doctor(work,
                                                                             ["doc1", "doc2"])
        finally:
            _dtlab("cluster", "firewall", "--name", NAME, "doc1", "--clear")
        pid = int(Path(f"/run/dtlab-cluster/{NAME}/sshd-doc3.pid").read_text())
        os.kill(pid, 15)
        time.sleep(0.5)
        cases["sshd of doc3 down (torchrun per node)"] = _doctor(
            work, ["doc1", "doc3"], "--collective-launcher", "torchrun")
    return cases


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dtlab.docsgen.records.doctor_cases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the record")
    return ap


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("doctorcases: needs root (it brings up a namespace cluster)", file=sys.stderr)
        return 2
    # down in any case: `cluster up` removes what it made when it fails, but a Ctrl-C or the
    # timeout here kills it (subprocess.run sends SIGKILL) before it can
    try:
        up = _dtlab("cluster", "up", "--name", NAME, "--subnet", SUBNET, "--nodes", 3,
                    "--ifnames", "eth0,ens5", "--shm", "doc3=64m", "--inter-node", "200mbit")
        if up.returncode:
            print(up.stdout + up.stderr, file=sys.stderr)
            return 1
        cases = record()
    finally:
        _dtlab("cluster", "down", "--name", NAME)
    out = {"what": "dtlab doctor --collective on a 3-node namespace cluster (200mbit links)",
           "date": time.strftime("%Y-%m-%d"), "machine": records.machine(),
           "cases": cases}
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    for name, c in cases.items():
        print(f"{name}: exit {c['exit_status']}, {c['seconds']} s, "
              f"{sum(f['severity'] == 'error' for f in c['findings'])} error(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
