"""``dtlab incident start / check / give-up``: the incident cluster brought up and broken, the
real job run and judged, everything taken down after.

One incident at a time: the one started is noted in ``$DTLAB_STATE/incident.json`` with its
folder, and the learner's progress in the course's state file (dtlab/exercises/progress.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dtlab.cluster import manage, netns
from dtlab.cluster.netns import Cluster, ClusterError
from dtlab.exercises import progress
from dtlab.incidents.catalogue import CLUSTER, INCIDENTS, Incident, write_files
from dtlab.launch import sessions

CHECK_DEADLINE_S = 120.0   # the job's whole run: a healthy one takes 15-30 s here


class IncidentError(ClusterError):
    """Bad input to `dtlab incident`; one line."""


@dataclass
class Context:
    cluster: Cluster
    work: Path

    def nodes(self):
        return self.cluster.all_nodes()

    def in_node(self, node, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(netns.node_argv(self.cluster, node, argv), capture_output=True,
                              text=True, timeout=timeout)

    def must(self, node, argv: list[str]) -> None:
        """``argv`` inside ``node``; a failure stops the incident's start (it would not be the
        incident it claims)."""
        p = self.in_node(node, argv)
        if p.returncode != 0:
            raise IncidentError(f"breaking the cluster failed on {node.name}: "
                                f"{' '.join(argv)}: {p.stderr.strip()[-300:]}")

    def interfaces(self, node) -> set[str]:
        out = self.in_node(node, ["ip", "-o", "link", "show"]).stdout
        return {ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ":" in ln}

    def link_qdiscs(self, node) -> list[str]:
        """`tc qdisc show` of both ends of the node's link."""
        root = subprocess.run(["tc", "qdisc", "show", "dev", node.host_veth],
                              capture_output=True, text=True, timeout=10).stdout
        return [root, self.in_node(node, ["tc", "qdisc", "show", "dev", node.ifname]).stdout]

    def deepspeed_env(self) -> dict[str, str]:
        """The variables DeepSpeed exports from .deepspeed_env (home, then the folder)."""
        out = {}
        for f in (Path.home() / ".deepspeed_env", self.work / ".deepspeed_env"):
            if f.is_file():
                for line in f.read_text(errors="replace").splitlines():
                    if "=" in line:
                        k, v = line.split("=", 1)
                        out[k.strip()] = v.strip()
        return out


def get(name: str) -> Incident:
    if name not in INCIDENTS:
        raise IncidentError(f"unknown incident {name!r}; choose from {', '.join(INCIDENTS)} "
                            "(dtlab incident list)")
    return INCIDENTS[name]


def state_path() -> Path:
    return progress.state_file().with_name("incident.json")


def active() -> dict | None:
    try:
        data = json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("name") in INCIDENTS else None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise IncidentError("incidents break a namespace cluster, which needs root: run it "
                            "with sudo (or as root)")


def _cluster() -> Cluster:
    return Cluster(name=CLUSTER["name"], nodes=CLUSTER["nodes"], rate=CLUSTER["rate"],
                   ifnames=CLUSTER["ifnames"], subnet=CLUSTER["subnet"], shm=CLUSTER["shm"])


def _programs() -> tuple[str, str]:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    if not deepspeed.is_file():
        raise IncidentError(f"no deepspeed launcher next to {sys.executable}: install the "
                            "extra (pip install -c constraints.txt -e '.[deepspeed]')")
    return str(deepspeed), sys.executable


OPS_BUILD_S = 900.0


def _ops_built(python: str, log=print) -> None:
    """DeepSpeed's shared-memory all-reduce op (shm_comm), which every rank of the DeepSpeed
    jobs loads, built here before the learner's first run: compiled by a job instead, on both
    nodes at once, it takes a minute, and a check's deadline that stops the job half-way leaves
    torch's build lock behind, on which every later job waits for ever."""
    code = ("from deepspeed.accelerator import get_accelerator as a; "
            "a().create_op_builder('ShareMemCommBuilder').load(verbose=False)")
    t0 = time.monotonic()
    log("checking DeepSpeed's CPU all-reduce op (built once: about a minute the first time) ...",
        flush=True)
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True,
                           timeout=OPS_BUILD_S)
    except subprocess.TimeoutExpired:
        raise IncidentError(f"building DeepSpeed's shm_comm op took over {OPS_BUILD_S:g} s: a "
                            "build stopped half-way leaves a lock; remove "
                            "~/.cache/torch_extensions/*/deepspeed_shm_comm and start again")
    if p.returncode != 0:
        raise IncidentError("DeepSpeed's shm_comm op does not build here (the incidents' jobs "
                            f"need it): {(p.stderr.strip().splitlines() or ['?'])[-1][-300:]}")
    if time.monotonic() - t0 > 10:
        log(f"  built in {time.monotonic() - t0:.0f} s")


def start(name: str, dest: str | None, log=print) -> Path:
    inc = get(name)
    _require_root()
    deepspeed, python = _programs()
    now = active()
    if now and now["name"] != name and netns.is_up(CLUSTER["name"]):
        raise IncidentError(f"incident {now['name']} is still open (folder {now['dir']}): run "
                            f"dtlab incident check {now['name']}, or give-up {now['name']}, "
                            "first")
    work = Path(dest or f"incident-{name}").resolve()
    _ops_built(python, log)
    if netns.is_up(CLUSTER["name"]) or Path(netns.STATE_ROOT / CLUSTER["name"]).exists():
        manage.down(CLUSTER["name"], log=lambda *_: None)  # a fresh cluster for every start
    c = netns.up(_cluster(), log=lambda *_: None)
    try:
        files = write_files(inc, work, deepspeed, python)
        inc.break_it(Context(c, work))
    except BaseException:
        manage.down(CLUSTER["name"], log=lambda *_: None)
        raise
    state_path().parent.mkdir(parents=True, exist_ok=True)
    state_path().write_text(json.dumps({"name": name, "dir": str(work),
                                        "started": time.strftime("%Y-%m-%d %H:%M")}))
    progress.note_incident(name, "started", str(work))
    log(f"incident {name}: cluster {c.name} is up (nodes "
        f"{', '.join(n.name for n in c.all_nodes())}), and something is wrong.\n")
    log(f"  symptom: {inc.symptom}\n")
    log(f"  your files, in {work}: {', '.join(files)}")
    log(f"  the job:  cd {work} && bash launch.sh")
    log(f"  tools:    {inc.tools}")
    log(f"  when you think it is fixed:  dtlab incident check {name}")
    log(f"  to see the answer:           dtlab incident give-up {name}")
    return work


def _opened(name: str) -> tuple[Incident, Context]:
    inc = get(name)
    _require_root()
    now = active()
    if not now or now["name"] != name:
        raise IncidentError(f"incident {name} is not started: dtlab incident start {name}")
    if not netns.is_up(CLUSTER["name"]):
        raise IncidentError(f"the incident cluster {CLUSTER['name']} is not up (taken down "
                            f"meanwhile?): start it again with dtlab incident start {name}")
    return inc, Context(Cluster.load(CLUSTER["name"]), Path(now["dir"]))


def run_job(ctx: Context, deadline_s: float, log=print) -> tuple[int | None, str]:
    """``bash launch.sh`` in the learner's folder, its output into check.log; (exit status or
    None past the deadline, the output). What the job leaves running is ended: its local
    processes by the job's variable, its ranks inside the nodes (reached over ssh, which does
    not carry the variable) by namespace."""
    job = sessions.Job()
    out_path = ctx.work / "check.log"
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        p = subprocess.Popen(["bash", "launch.sh"], cwd=ctx.work, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             env=job.env(dict(os.environ, PYTHONUNBUFFERED="1")))
        ticker = threading.Event()

        def tick():
            while not ticker.wait(10):
                log(f"  ... {time.monotonic() - t0:.0f} s", flush=True)
        threading.Thread(target=tick, daemon=True).start()
        try:
            rc = p.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            ticker.set()
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            job.stop()
            netns.end_jobs(ctx.cluster)
            p.wait(timeout=10)
    return rc, out_path.read_text(errors="replace")


def verdict(inc: Incident, ctx: Context, rc: int | None, output: str, since: float,
            deadline_s: float) -> tuple[bool, list[str]]:
    """Passed only when the job ended by itself with status 0, every rank of the original world
    ran where it should, the run equals the baseline, and the cause reads back as restored."""
    if rc is None:
        return False, [f"the job did not end within {deadline_s:g} s (stopped)"]
    if rc != 0:
        return False, [f"the job failed (exit status {rc})"]
    summary = ctx.work / "run" / "summary.json"
    try:
        if summary.stat().st_mtime < since:
            raise OSError
        s = json.loads(summary.read_text())
    except (OSError, ValueError):
        return False, ["the job ended without writing run/summary.json"]
    hosts = sorted(s.get("hosts") or [])
    if hosts != sorted(inc.hosts):
        return False, [f"the job ran on {', '.join(hosts) or 'nothing'}, not on every node at "
                       f"the original world size ({', '.join(inc.hosts)})"]
    base = s.get("baseline") or {}
    if not (s.get("ok") is True and base.get("ok") is True):
        return False, [f"the job ran on every node but did not train equal to the baseline "
                       f"(max rel loss diff {base.get('max_rel_loss_diff')})"]
    lines = [f"the job ran on every node ({', '.join(hosts)}) and trained equal to the baseline "
             f"(max rel loss diff {base['max_rel_loss_diff']:.1e})"]
    ok, seen = inc.restored(ctx, output)
    if not ok:
        return False, lines + [f"but {seen}: the cause is still there"]
    return True, lines + [f"the cause is fixed where it lives: {seen}"]


def check(name: str, deadline_s: float = CHECK_DEADLINE_S, log=print) -> bool:
    if not 1 <= deadline_s <= 1800:
        raise IncidentError(f"--deadline {deadline_s:g}: give 1..1800 seconds")
    inc, ctx = _opened(name)
    log(f"incident {name}: running the job (bash launch.sh in {ctx.work}; output in check.log; "
        f"at most {deadline_s:g} s) ...", flush=True)
    since = time.time()
    rc, output = run_job(ctx, deadline_s, log)
    passed, lines = verdict(inc, ctx, rc, output, since, deadline_s)
    for ln in lines:
        log(f"  {ln}")
    if not passed:
        tail = [ln for ln in output.splitlines() if ln.strip()][-8:]
        if rc != 0 and tail:
            log("  the job's last lines:\n    " + "\n    ".join(tail))
        log(f"NOT FIXED. The cluster stays up; dtlab incident give-up {name} explains it.")
        progress.note_incident(name, "checked, not fixed", str(ctx.work))
        return False
    log(f"FIXED. Found fastest with: {inc.fastest}")
    teardown()
    progress.note_incident(name, "fixed", str(ctx.work))
    return True


def give_up(name: str, log=print) -> None:
    inc = get(name)
    _require_root()
    now = active()
    log(f"incident {name}: {inc.title}\n")
    log(f"  cause: {inc.cause}\n")
    log(f"  fix:   {inc.fix}\n")
    log(f"  found fastest with: {inc.fastest}")
    if now and now["name"] == name:
        teardown()
        progress.note_incident(name, "gave up", now["dir"])


def teardown() -> None:
    manage.down(CLUSTER["name"], log=lambda *_: None)
    try:
        state_path().unlink()
    except FileNotFoundError:
        pass
    print(f"cluster {CLUSTER['name']} taken down; your folder stays")
