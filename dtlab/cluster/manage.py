"""``dtlab cluster up / status / down / exec``: the nodes and links (netns.py), then Slurm on
them when asked (slurm.py)."""
from __future__ import annotations

import subprocess

from dtlab.cluster import netns, slurm
from dtlab.cluster.netns import Cluster, ClusterError


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """'n2=64m' -> ('n2', '64m')."""
    node, eq, value = text.partition("=")
    if not eq or not node or not value:
        raise ClusterError(f"{flag} {text!r}: give NODE=VALUE, e.g. n2=64m")
    return node, value


def up(c: Cluster, log=print) -> Cluster:
    c = netns.up(c, log)
    if c.slurm:
        try:
            slurm.up(c, c.ranks_per_node, log)
        except ClusterError:
            slurm.stop(c)
            raise
    return c


def down(name: str = "main", log=print) -> None:
    try:
        c = Cluster.load(name)
        slurm.stop(c)
    except ClusterError:
        pass  # no cluster.json: an up that died early; the journal still lists what to remove
    slurm.remove_conf(name)
    netns.down(name, log)


def exec_in(name: str, node: str, argv: list[str]) -> int:
    """Run a command inside a node, as `ip netns exec` would, with the node's host name."""
    if not argv:
        raise ClusterError("dtlab cluster exec NODE -- COMMAND: give the command after --")
    c = Cluster.load(name)
    return subprocess.call(netns.node_argv(c, c.find(node), argv))


def print_status(name: str, as_json: bool) -> int:
    import json
    s = netns.status(name)
    if as_json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"cluster {s['name']}: inter-node links {s['rate']}, subnet {s['subnet']}, bridge "
          f"{s['bridge']}, slurm {'on' if s['slurm'] else 'off'}")
    for n in s["nodes"]:
        flags = " ".join(f"{k} {'up' if n[k] else 'DOWN'}" for k in ("namespace", "sshd")) + \
            (f" slurmd {'up' if n['slurmd'] else 'DOWN'}" if s["slurm"] else "") + \
            f" link {n['link'] if n['link'] == 'up' else 'DOWN'}" + \
            (f" /dev/shm {n['shm']}" if n["shm"] else "")
        cores = f" cores {','.join(map(str, n['cores']))}" if n["cores"] else ""
        print(f"  {n['node']:<6} {n['address']:<15} {n['ifname']:<8}{cores}  {flags}")
    return 0
