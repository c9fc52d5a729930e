"""A real multi-node cluster on one machine: every node a network namespace with its own address,
interface, host name, sshd (and slurmd), the links between nodes shaped to a bandwidth.

    dtlab cluster up --nodes 2 --inter-node 1gbit      (root)
    dtlab cluster status
    dtlab cluster down

``netns.py`` builds and removes the nodes and links; ``slurm.py`` runs Slurm on them. Tools
reach the nodes through ``node_argv`` (a command run inside a node). docs/cluster.md explains it.
"""
from __future__ import annotations

import argparse

from dtlab.errors import fail


def cmd_cluster(args, rest) -> int:
    from dtlab.cluster import manage, netns  # the machinery: only when the command runs
    from dtlab.cluster.netns import Cluster, check_name, parse_rate
    check_name(args.name)  # before anything reads or makes /run/dtlab-cluster/<name>
    if args.action == "up":
        ifnames = tuple(t.strip() for t in args.ifnames.split(",") if t.strip()) or ("eth0",)
        shm = dict(manage.parse_assignment(a, "--shm") for a in args.shm)
        c = Cluster(name=args.name, nodes=args.nodes, rate=parse_rate(args.inter_node),
                    ifnames=ifnames, subnet=args.subnet, cores_per_node=args.cores_per_node,
                    ranks_per_node=args.ranks_per_node, slurm=args.slurm, shm=shm)
        try:
            manage.up(c)  # removes what it made when it fails or is interrupted
        except KeyboardInterrupt:
            fail(f"cluster up --name {args.name} interrupted; what it had made is removed",
                 code=130)
        return 0
    if args.action == "link":
        print(netns.set_link(args.name, args.node, args.state))
        return 0
    if args.action == "firewall":
        print(netns.firewall(args.name, args.node, None if args.clear else args.block))
        return 0
    if args.action == "down":
        manage.down(args.name)
        return 0
    if args.action == "status":
        if args.png:
            print(f"picture: {manage.draw(args.name, args.png)}")
        return manage.print_status(args.name, args.json)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return manage.exec_in(args.name, args.node, command)


def add_commands(sub) -> None:
    cl = sub.add_parser("cluster", help="a multi-node cluster on this machine: network "
                        "namespaces, shaped links, sshd and Slurm per node (root)")
    csub = cl.add_subparsers(dest="action", required=True)
    cu = csub.add_parser("up", help="bring the nodes and links up (idempotent)")
    cu.add_argument("--nodes", type=int, default=2)
    cu.add_argument("--inter-node", default="unshaped",
                    help="bandwidth of every node's link: 100mbit, 1gbit, 10gbit, ... or "
                         "unshaped (default)")
    cu.add_argument("--ranks-per-node", type=int, default=2,
                    help="processes a node takes (the CPUs it declares to Slurm; default 2)")
    cu.add_argument("--ifnames", default="eth0",
                    help="each node's interface name, comma-separated (node i takes the i-th, "
                         "the last for the rest): eth0,ens5 gives n2 another name than n1")
    cu.add_argument("--cores-per-node", type=int, default=0,
                    help="pin each node to its own cores (0: share all; default)")
    cu.add_argument("--subnet", default="10.77.0.0/24", help="the nodes' private subnet")
    cu.add_argument("--slurm", action="store_true", help="run slurmctld and a slurmd per node")
    cu.add_argument("--shm", action="append", default=[], metavar="NODE=SIZE",
                    help="give NODE a /dev/shm of its own of SIZE (64m: a Docker container's "
                         "default); repeatable")
    for a in csub.choices.values():
        a.add_argument("--name", default="main", help="which cluster (default main: nodes n1, "
                       "n2, ...; another name X gives nodes X1, X2, ...)")
    cd = csub.add_parser("down", help="remove every namespace, link, daemon and /etc/hosts line")
    cs = csub.add_parser("status", help="nodes, addresses, link rate, daemons")
    cs.add_argument("--json", action="store_true")
    cs.add_argument("--png", default=None, help="also draw the topology into this file")
    ce = csub.add_parser("exec", help="run a command inside a node: dtlab cluster exec n1 -- CMD")
    ce.add_argument("node")
    ce.add_argument("command", nargs=argparse.REMAINDER)
    lk = csub.add_parser("link", help="pull or plug a node's cable: dtlab cluster link n2 down")
    lk.add_argument("node")
    lk.add_argument("state", choices=("up", "down"))
    fw = csub.add_parser("firewall", help="drop incoming TCP to some ports on a node "
                         "(nftables inside it), or --clear")
    fw.add_argument("node")
    g = fw.add_mutually_exclusive_group(required=True)
    g.add_argument("--block", metavar="PORTS", help="ports and ranges: 32768-60999,29500")
    g.add_argument("--clear", action="store_true", help="remove the node's rules")
    for a in (cd, cs, ce, lk, fw):
        a.add_argument("--name", default="main", help="which cluster (default main)")
    cl.set_defaults(func=cmd_cluster)
