"""What a test run may not leave on the machine: network namespaces, processes it started (lab
ranks, torchrun agents, dtlab commands, the clusters' daemons), dtlab entries in /dev/shm,
nftables tables named dtlab, cluster state, links, /etc/hosts lines and the learner's course state
(a test's exercise or incident noted in ~/.local/state/dtlab/exercises.json). .ci/run takes a
snapshot before it starts anything and checks after `make test`, once it has stopped the
services it started itself (the main cluster with Slurm, the ssh test hosts): whatever is new
then was left behind.

    python3 tests/leaks.py snapshot FILE          what is there already (no leak of this run)
    python3 tests/leaks.py check [--baseline FILE]  prints each leak; exit status 1 if any

Standard library only: .ci/run runs it before the virtual environment exists.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHM = Path("/dev/shm")
PROC = Path("/proc")
CLUSTER_STATE = Path("/run/dtlab-cluster")
HOSTS = Path("/etc/hosts")
# module names after `python -m` that only dtlab's runs start
MODULES = ("labs.", "dtlab", "deepspeed.launcher", "torch.distributed.run")


def _out(*argv: str) -> str:
    """A command's output, or "" when the tool is missing or fails (nothing to find there)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def namespaces(ip_netns_list: str) -> list[str]:
    """``ip netns list`` output -> the names ('dtlab-main-n1 (id: 0)' -> 'dtlab-main-n1')."""
    return [ln.split()[0] for ln in ip_netns_list.splitlines() if ln.strip()]


def nft_tables(nft_list_tables: str) -> list[str]:
    """``nft list tables`` output -> the tables named like dtlab's ('table inet dtlab')."""
    return [ln.strip() for ln in nft_list_tables.splitlines()
            if ln.startswith("table ") and "dtlab" in ln.split()[-1]]


def links(ip_o_link: str) -> list[str]:
    """``ip -o link`` output -> the cluster's bridges and veth ends (dtbr-*, dtv*, dtp*)."""
    names = [ln.split(":")[1].strip().split("@")[0] for ln in ip_o_link.splitlines()
             if ln.count(":") >= 2]
    return [n for n in names if n.startswith(("dtbr-", "dtv", "dtp"))]


def shm_entries(folder: Path = SHM) -> list[str]:
    try:
        # ours, and torch's (torch.multiprocessing's file_system sharing: torch_<pid>_...)
        return sorted(p.name for p in folder.iterdir() if p.name.startswith(("dtlab", "torch_")))
    except OSError:
        return []


def marked(argv: list[str], environ: dict[str, str]) -> str | None:
    """Why a process is one a dtlab run started (None: it is not)."""
    for i, a in enumerate(argv):
        if a == "-m" and i + 1 < len(argv) and argv[i + 1].startswith(MODULES):
            return f"python -m {argv[i + 1]}"
        if os.path.basename(a) in ("torchrun", "dtlab", "deepspeed") and i <= 1:
            return os.path.basename(a)
        if "/run/dtlab-cluster/" in a or "/run/dtlab-sshd/" in a:
            return "a daemon of a dtlab cluster or test host"
    if "TORCHELASTIC_RUN_ID" in environ:
        return "a rank under torchrun"
    if "DTLAB_CACHE" in environ:  # tests/conftest.py sets it for everything the suite starts
        return "started by the test session"
    return None


def _read_argv(pid_dir: Path) -> list[str]:
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _read_environ(pid_dir: Path) -> dict[str, str]:
    try:
        raw = (pid_dir / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def _ancestors(proc: Path, pid: int) -> set[int]:
    """``pid`` and every parent up to 1: this check and the script that runs it."""
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = (proc / str(pid) / "stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def processes(proc: Path = PROC, me: int | None = None) -> list[str]:
    """Every process a dtlab run started, as 'pid PID (why): command'. Kernel threads and
    zombies have no command line: they hold nothing."""
    skip = _ancestors(proc, os.getpid() if me is None else me)
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) in skip:
            continue
        argv = _read_argv(d)
        why = marked(argv, _read_environ(d)) if argv else None
        if why:
            found.append(f"pid {d.name} ({why}): {' '.join(argv)[:200]}")
    return sorted(found, key=lambda s: int(s.split()[1]))


def learner_state() -> list[str]:
    """The course's state file where a learner's dtlab exercise/check/incident write it (no
    DTLAB_STATE), with its size and modification time: a rewrite shows as a new item."""
    root = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    f = root / "dtlab" / "exercises.json"
    try:
        st = f.stat()
    except OSError:
        return []
    return [f"{f} ({st.st_size} bytes, modified {st.st_mtime_ns})"]


def collect() -> dict[str, list[str]]:
    hosts = HOSTS.read_text().splitlines() if HOSTS.is_file() else []
    return {
        "network namespace": namespaces(_out("ip", "netns", "list")),
        "process": processes(),
        "/dev/shm entry": shm_entries(),
        "nft table": nft_tables(_out("nft", "list", "tables")),
        "link": links(_out("ip", "-o", "link")),
        "cluster state": sorted(p.name for p in CLUSTER_STATE.iterdir())
        if CLUSTER_STATE.is_dir() else [],
        "/etc/hosts line": [ln for ln in hosts if "# dtlab cluster" in ln],
        "learner state": learner_state(),
    }


def leaks(now: dict[str, list[str]], baseline: dict[str, list[str]]) -> list[str]:
    """What ``now`` has that ``baseline`` had not, one line each ('network namespace x')."""
    return [f"{kind} {item}" for kind, items in now.items() for item in items
            if item not in baseline.get(kind, [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/leaks.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("snapshot").add_argument("file")
    ck = sub.add_parser("check")
    ck.add_argument("--baseline", default=None, help="a snapshot taken before the run")
    a = ap.parse_args(argv)
    if a.action == "snapshot":
        Path(a.file).write_text(json.dumps(collect(), indent=1) + "\n")
        return 0
    baseline = json.loads(Path(a.baseline).read_text()) if a.baseline else {}
    left = leaks(collect(), baseline)
    if left:
        print(f"tests/leaks.py: the run left {len(left)} thing(s) behind:", *left,
              sep="\n  ", file=sys.stderr)
        return 1
    print("tests/leaks.py: nothing left behind (namespaces, processes, /dev/shm, nft tables, "
          "cluster state, learner state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
