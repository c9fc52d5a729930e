"""Slurm on the namespace cluster: slurmctld in the root namespace on the bridge's address, one
slurmd inside every node's namespace (its own address and host name), munge for both.

A job's steps start inside the nodes, so ``sbatch -N 2 slurm/torchrun.sbatch ddp`` puts one
torchrun agent in n1 and one in n2, and their ranks talk over the shaped link. This replaces
the earlier loopback cluster (two slurmd on 127.0.0.1 ports, one network stack), on which every
"inter-node" byte was a memory copy; ``slurm/local/up.sh`` brings this one up.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from dtlab.cluster.netns import Cluster, ClusterError, Journal, _alive, _kill, _run, node_argv

CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by dtlab cluster"
CTLD_PORT = 16817
LOG = Path("/var/log/dtlab-slurm")
WAIT_S = 60


def write_conf(c: Cluster, cpus: int) -> None:
    if CONF.is_file() and not CONF.read_text().startswith("# written by dtlab"):
        raise ClusterError(f"{CONF} exists and was not written by dtlab; move it away first")
    nodes = c.all_nodes()
    run = c.state_dir
    lines = [f"{MARK} {c.name}", "ClusterName=dtlab",
             f"SlurmctldHost={socket.gethostname().split('.')[0]}({c.bridge_address})",
             f"SlurmctldPort={CTLD_PORT}", "SlurmdPort=6818", "SlurmUser=root",
             "AuthType=auth/munge", f"StateSaveLocation={run}/slurmctld",
             f"SlurmdSpoolDir={run}/slurmd.%n", f"SlurmctldPidFile={run}/slurmctld.pid",
             f"SlurmdPidFile={run}/slurmd-%n.pid", f"SlurmctldLogFile={LOG}/slurmctld.log",
             f"SlurmdLogFile={LOG}/slurmd.%n.log", "ProctrackType=proctrack/linuxproc",
             "TaskPlugin=task/none", "SelectType=select/cons_tres",
             "SelectTypeParameters=CR_Core", "MpiDefault=none", "MailProg=/bin/true",
             "ReturnToService=2", "AccountingStorageType=accounting_storage/none",
             "JobAcctGatherType=jobacct_gather/none", "SlurmdTimeout=30", "InactiveLimit=0",
             "KillWait=5"]
    lines += [f"NodeName={n.name} NodeAddr={n.address} CPUs={cpus} State=UNKNOWN"
              for n in nodes]
    lines.append(f"PartitionName=debug Nodes={','.join(n.name for n in nodes)} Default=YES "
                 "MaxTime=30 State=UP OverSubscribe=FORCE")
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text("\n".join(lines) + "\n")


def _idle(c: Cluster) -> bool:
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                       timeout=10)
    states = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
    return all(states.get(n.name, "").rstrip("*") == "idle" for n in c.all_nodes())


def up(c: Cluster, cpus: int, log=print) -> None:
    """munged (if none runs), slurmctld, a slurmd per node; waits until every node is idle."""
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if not (Path("/usr/sbin") / tool).exists() and not Path(f"/usr/bin/{tool}").exists():
            raise ClusterError(f"{tool} is not installed (Debian: apt-get install slurmctld "
                               "slurmd slurm-client munge; slurm/local/up.sh does it)")
    journal = Journal(c.state_dir)
    started = []
    wrote = not (CONF.is_file() and CONF.read_text().startswith(f"{MARK} {c.name}\n"))
    try:
        write_conf(c, cpus)
        journal.add("file", path=str(CONF))
        LOG.mkdir(parents=True, exist_ok=True)
        (c.state_dir / "slurmctld").mkdir(exist_ok=True)
        Path("/run/munge").mkdir(exist_ok=True)
        subprocess.run(["chown", "munge:munge", "/run/munge"], check=False, timeout=10)
        daemons = [(Path("/run/munge/munged.pid"), ["runuser", "-u", "munge", "--",
                                                     "/usr/sbin/munged"]),
                   (c.state_dir / "slurmctld.pid", ["/usr/sbin/slurmctld", "-f", str(CONF)])]
        for n in c.all_nodes():
            (c.state_dir / f"slurmd.{n.name}").mkdir(exist_ok=True)
            daemons.append((c.state_dir / f"slurmd-{n.name}.pid",
                            node_argv(c, n, ["/usr/sbin/slurmd", "-f", str(CONF), "-N", n.name])))
        for pidfile, argv in daemons:
            if not _alive(pidfile):
                journal.add("pidfile", path=str(pidfile))
                started.append(pidfile)
                _run(argv)
        deadline = time.time() + WAIT_S
        while not _idle(c):
            if time.time() > deadline:
                raise ClusterError(f"Slurm nodes not idle after {WAIT_S} s; logs in {LOG}")
            time.sleep(0.5)
    except BaseException:  # what this call started goes; daemons that ran before stay
        for pidfile in reversed(started):
            _kill(pidfile)
        if wrote:
            remove_conf(c.name)
        raise
    log(f"slurm up on cluster {c.name}: nodes {', '.join(n.name for n in c.all_nodes())} idle "
        f"(controller {c.bridge_address}:{CTLD_PORT}, config {CONF}, logs {LOG})")


def remove_conf(name: str) -> None:
    if CONF.is_file() and CONF.read_text().startswith(f"{MARK} {name}\n"):
        CONF.unlink()


def stop(c: Cluster) -> None:
    for n in c.all_nodes():
        _kill(c.state_dir / f"slurmd-{n.name}.pid")
    _kill(c.state_dir / "slurmctld.pid")
