"""``dtlab cluster up / status / down / exec``: the nodes and links (netns.py), then Slurm on
them when asked (slurm.py)."""
from __future__ import annotations

import json
import subprocess

from dtlab.cluster import netns, slurm
from dtlab.cluster.netns import Cluster, ClusterError
from dtlab.plotting import plt_agg


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """'n2=64m' -> ('n2', '64m')."""
    node, eq, value = text.partition("=")
    if not eq or not node or not value:
        raise ClusterError(f"{flag} {text!r}: give NODE=VALUE, e.g. n2=64m")
    return node, value


def up(c: Cluster, log=print) -> Cluster:
    """The nodes, then Slurm on them if asked. Whatever fails or is interrupted (Ctrl-C, a
    command's timeout) takes down what this call made: netns.up and slurm.up each remove their
    own, and the nodes go too when this call brought them up."""
    was_up = netns.is_up(c.name)
    c = netns.up(c, log)
    if c.slurm:
        try:
            slurm.up(c, c.ranks_per_node, log)
        except BaseException:
            if not was_up:
                netns.rollback(c.name, log)
            raise
    return c


def down(name: str = "main", log=print) -> None:
    netns.check_name(name)
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
    c = Cluster.load(name, "--name")
    return subprocess.call(netns.node_argv(c, c.find(node), argv))


def print_status(name: str, as_json: bool) -> int:
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


def draw(name: str, path: str) -> str:
    """The cluster as it is: the bridge in the root namespace (the controller's address), every
    node with its address, interface and daemons, every link with its rate. Drawn from
    ``dtlab cluster status``, not by hand."""
    plt = plt_agg()
    s = netns.status(name)
    from matplotlib.patches import FancyBboxPatch  # matplotlib: slow to import, only to draw
    nodes = s["nodes"]
    fig, ax = plt.subplots(figsize=(max(7, 2.6 * len(nodes)), 4.6))
    ax.set_xlim(0, len(nodes))
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0.1, 0.78), len(nodes) - 0.2, 0.14, boxstyle="round,pad=0.01",
                                fc="#eeeeee", ec="#555555"))
    ax.text(len(nodes) / 2, 0.85, f"root namespace: bridge {s['bridge']}"
            + ("; slurmctld" if s["slurm"] else "") + "; no route out of the subnet "
            f"{s['subnet']}", ha="center", va="center", fontsize=9)
    for i, n in enumerate(nodes):
        x = i + 0.5
        ax.plot([x, x], [0.55, 0.78], color="#4c78a8", lw=3)
        ax.text(x + 0.04, 0.665, f"veth, tbf {s['rate']}\nboth directions", fontsize=7.5,
                va="center")
        ax.add_patch(FancyBboxPatch((x - 0.42, 0.08), 0.84, 0.47, boxstyle="round,pad=0.01",
                                    fc="#dbe9f6", ec="#555555"))
        daemons = "sshd" + (" + slurmd" if s["slurm"] else "")
        cores = f"\ncores {','.join(map(str, n['cores']))}" if n["cores"] else ""
        ax.text(x, 0.31, f"node {n['node']}\nnetwork + UTS namespace\n{n['ifname']} "
                f"{n['address']}\nlo (ranks of this node){cores}\n{daemons}", ha="center",
                va="center", fontsize=8.5)
    ax.set_title(f"dtlab cluster {s['name']}: {len(nodes)} nodes on one machine (drawn from "
                 "`dtlab cluster status`)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
