"""``dtlab``: parse the command line and hand it to the tool that does the work.

    dtlab list [--names]
    dtlab run LAB [--nproc N] [--max-restarts R] [lab flags...]
    dtlab tour [--nproc N] [--steps S] [--out DIR] [--only a,b] [--skip c]
    dtlab bench comm [--nproc 2,4] [--ops ...] [--impl library,ring,...] [--sizes ...] [--json F]
    dtlab bench ddp [--nproc 2] [--preset small] [--steps 30] [--repeats 3]
    dtlab profile LAB|compare [--nproc N] [lab flags...]
    dtlab doctor [--hostfile F] [--include S | --exclude S] [--master-addr A] [--json]
    dtlab plan [calibrate|validate] [--preset small | --layers L --d-model H --heads A] ...
    dtlab memory --params 7e9 [--nodes N --gpus-per-node G] [--zero 0|1|2|3] [--offload ...]
    dtlab exercise NAME [--dest DIR]   /   dtlab check NAME [--impl FILE]

Nothing here plans, runs or renders: each command is one call into its family's folder (dtlab/launch,
report, bench, doctor, plan, cluster, docsgen, exercises). Bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from dtlab import registry
from dtlab.errors import UsageError, fail


def cmd_list(args, rest) -> int:
    if args.names:  # one name a line, for scripts (the launchers check lab names with it)
        print("\n".join(registry.LABS))
        return 0
    from rich.table import Table

    from dtlab.report.tables import console
    t = Table(title="dtlab labs")
    for c in ("lab", "what it shows", "processes", "status"):
        t.add_column(c)
    for lab in registry.LABS.values():
        t.add_row(lab.name, lab.summary, lab.world_text(), lab.status())
    console(120).print(t)
    return 0


def cmd_run(args, rest) -> int:
    from dtlab.launch.launcher import run_one
    return run_one(args.lab, args.nproc, rest, args.max_restarts, args.nnodes, args.cluster)


def cmd_profile(args, rest) -> int:
    from dtlab.report import profile
    if args.lab == "compare":
        return profile.compare(args.nproc, rest, args.nnodes, args.cluster)
    return profile.profile_one(args.lab, args.nproc, rest, args.nnodes, args.cluster)


def cmd_tour(args, rest) -> int:
    from dtlab.report.tour import tour
    return tour(args.only, args.skip, args.nproc, args.steps, args.out, args.json)


def cmd_bench_comm(args, rest) -> int:
    from dtlab.bench.collectives import bench_comm
    return bench_comm(args.nproc, args.json, rest, args.nnodes, args.cluster)


def cmd_bench_ddp(args, rest) -> int:
    from dtlab.bench.ddp import bench_ddp
    return bench_ddp(args.nproc, args.preset, args.steps, args.repeats, args.out, args.variants)


def cmd_bench_cluster(args, rest) -> int:
    from dtlab.bench.cluster import run
    return run(args.out, args.cluster, args.rates, args.train_rates, args.sizes, args.preset,
               args.steps)


def cmd_bench_hang(args, rest) -> int:
    from dtlab.bench.hang import run
    return run(args.json, args.runs, args.faults, args.timeout, args.cluster, args.work)


def cmd_debug(args, rest) -> int:
    from dtlab.report.hang_report import hang
    return hang(args.run_dir, args.wait)


def cmd_doctor(args, rest) -> int:
    from dtlab.doctor import diagnose as doctor
    return doctor.run(args)


def cmd_memory(args, rest) -> int:
    from dtlab.plan import memory_estimate as estimate
    return estimate.run(args)


def cmd_plan(args, rest) -> int:
    from dtlab.plan import search as plan
    return plan.run(args)


def cmd_docs(args, rest) -> int:
    from dtlab.docsgen import refresh as docsref
    try:
        return docsref.main(args)
    except docsref.DocsError as e:
        print(f"dtlab docs: {e}", file=sys.stderr)
        return 2


def cmd_exercise(args, rest) -> int:
    from dtlab.exercises import checker as exercises
    path = exercises.write_skeleton(args.name, args.dest, args.force)
    print(f"wrote {path}: fill in the TODOs, then run\n  dtlab check {args.name} --impl {path}")
    return 0


def cmd_check(args, rest) -> int:
    from dtlab.exercises import checker as exercises
    impl = args.impl or exercises.get(args.name).file
    print(f"checking {impl} ({exercises.get(args.name).summary}) ...", flush=True)
    passed, lines = exercises.check(args.name, impl)
    print("\n".join(lines))
    print("PASS" if passed else "FAIL: see above for what differed")
    return 0 if passed else 1


def cmd_cluster(args, rest) -> int:
    from dtlab.cluster import manage, netns
    from dtlab.cluster.netns import Cluster, parse_rate
    if args.action == "up":
        ifnames = tuple(t.strip() for t in args.ifnames.split(",") if t.strip()) or ("eth0",)
        shm = dict(manage.parse_assignment(a, "--shm") for a in args.shm)
        manage.up(Cluster(name=args.name, nodes=args.nodes, rate=parse_rate(args.inter_node),
                          ifnames=ifnames, subnet=args.subnet,
                          cores_per_node=args.cores_per_node,
                          ranks_per_node=args.ranks_per_node, slurm=args.slurm, shm=shm))
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
            from dtlab.report.pictures import draw_cluster  # matplotlib: only for --png
            print(f"picture: {draw_cluster(netns.status(args.name), args.png)}")
        return manage.print_status(args.name, args.json)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return manage.exec_in(args.name, args.node, command)


def add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nnodes", type=int, default=1,
                   help="run on this many nodes of the namespace cluster (dtlab cluster up), "
                        "--nproc processes on each (default 1: this machine alone)")
    p.add_argument("--cluster", default="main", help="which namespace cluster (default main)")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtlab", description="Distributed-training lab.")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="every lab, one line, and whether it can run here")
    ls.add_argument("--names", action="store_true", help="only the names, one a line")
    ls.set_defaults(func=cmd_list)

    r = sub.add_parser("run", allow_abbrev=False,
                       help="run one lab under torchrun and compare it with the baseline",
                       description="Flags other than --nproc and --max-restarts go to the lab "
                                   "(python -m labs.LAB --help lists them).")
    r.add_argument("lab")
    r.add_argument("--nproc", type=int, default=None,
                   help="processes (default: the lab's tour size)")
    r.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts after a rank dies (use with the lab's --ckpt-dir)")
    add_placement(r)
    r.set_defaults(func=cmd_run, forwards=True)

    t = sub.add_parser("tour", help="run every lab and variant this machine can, verified; "
                       "report.md, report.html and pictures in --out")
    t.add_argument("--nproc", type=int, default=None, help="processes for multi-process labs")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--out", default="runs/tour")
    t.add_argument("--only", default=None, help="comma-separated labs to run")
    t.add_argument("--skip", default=None, help="comma-separated labs to leave out")
    t.add_argument("--json", default=None,
                   help="also write the tour's record here (OUT/tour.json always holds it)")
    t.set_defaults(func=cmd_tour)

    b = sub.add_parser("bench", help="benchmarks: comm (collectives), ddp (ours vs torch's)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bc = bsub.add_parser("comm", help="time collectives, library vs ours, over message sizes",
                         description="Other flags go to dtlab.bench.collectives: --ops, --impl, "
                                     "--sizes, --iters, --warmup.")
    bc.add_argument("--nproc", default="2", help="world sizes, e.g. 2 or 2,4 (default 2)")
    bc.add_argument("--json", default="runs/bench/comm.json", help="where the rows go")
    add_placement(bc)
    bc.set_defaults(func=cmd_bench_comm, forwards=True)
    bd = bsub.add_parser("ddp", help="median step time of our DDP vs torch DDP")
    bd.add_argument("--nproc", type=int, default=2)
    bd.add_argument("--preset", default="small")
    bd.add_argument("--steps", type=int, default=30)
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--out", default="runs/bench/ddp")
    bd.add_argument("--variants", default="all",
                    help="comma list of torch, own-ring, own-library, own-shm (default all; "
                         "torch is always run: the ratios are to it)")
    bd.set_defaults(func=cmd_bench_ddp)
    bk = bsub.add_parser("cluster", help="bus bandwidth vs link rate and step time per strategy "
                         "on the namespace cluster (root)")
    bk.add_argument("--out", default="runs/bench/cluster")
    bk.add_argument("--cluster", default="main")
    bk.add_argument("--rates", default="100mbit,1gbit,10gbit,unshaped",
                    help="link rates for the collectives")
    bk.add_argument("--train-rates", default="1gbit,100mbit",
                    help="link rates for the training comparison")
    bk.add_argument("--sizes", default="1MiB,8MiB")
    bk.add_argument("--preset", default="small")
    bk.add_argument("--steps", type=int, default=8)
    bk.set_defaults(func=cmd_bench_cluster)
    bh = bsub.add_parser("hang", help="inject stalls, collective mismatches and pulled links "
                         "into real runs: is the desync report right, and how soon")
    bh.add_argument("--runs", type=int, default=10, help="runs per fault (default 10)")
    bh.add_argument("--faults", default="stall,mismatch",
                    help="stall, mismatch, link (link: the namespace cluster, root)")
    bh.add_argument("--timeout", type=float, default=5.0,
                    help="the runs' collective timeout in seconds (default 5)")
    bh.add_argument("--cluster", default="main", help="cluster for the link fault")
    bh.add_argument("--work", default="runs/bench/hang", help="where the runs write")
    bh.add_argument("--json", default="runs/bench/hang.json", help="the record")
    bh.set_defaults(func=cmd_bench_hang)

    pr = sub.add_parser("profile", allow_abbrev=False,
                        help="run a lab under torch.profiler: computation, communication, "
                             "overlap per rank, TensorBoard traces",
                        description="Flags other than --nproc go to the lab; --out DIR gets "
                                    "the run record and DIR/tb the traces (default 8 steps).")
    pr.add_argument("lab", help="a lab, or `compare`: DDP (torch, ours), ZeRO 1-3, FSDP2, TP "
                    "and PP profiled alike, one table")
    pr.add_argument("--nproc", type=int, default=None, help="processes (default: tour size)")
    add_placement(pr)
    pr.set_defaults(func=cmd_profile, forwards=True)

    from dtlab.doctor import diagnose as doctor
    from dtlab.plan import memory_estimate as estimate, search as plan
    doctor.add_arguments(sub.add_parser(
        "doctor", help="check a DeepSpeed hostfile and a multi-node setup before launch",
        description=doctor.__doc__.split("\n\n")[0])).set_defaults(func=cmd_doctor)
    estimate.add_arguments(sub.add_parser(
        "memory", help="estimate GPU and CPU memory per ZeRO stage, offload and precision",
        description=estimate.__doc__.split("\n\n")[0])).set_defaults(func=cmd_memory)

    plan.add_arguments(sub.add_parser(
        "plan", help="rank the layouts that fit a model on a cluster by predicted step time "
        "and memory; calibrate this machine; validate the predictions against runs",
        description=plan.__doc__.split("\n\n")[0])).set_defaults(func=cmd_plan)

    dbg = sub.add_parser("debug", help="what a hanging run's ranks are doing")
    dsub = dbg.add_subparsers(dest="what", required=True)
    dh = dsub.add_parser("hang", help="every rank's flight record and stacks, and the desync "
                         "report: who is behind, blocked in what, which collectives differ")
    dh.add_argument("run_dir", help="the --out folder of the running job")
    dh.add_argument("--wait", type=float, default=10.0,
                    help="seconds to wait for every rank's answer (default 10)")
    dh.set_defaults(func=cmd_debug)

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

    from dtlab.docsgen import refresh as docsref
    docsref.add_arguments(sub.add_parser(
        "docs", help="the reference run behind docs/: refresh (make docs), check, list",
        description=docsref.__doc__.split("\n\n")[0])).set_defaults(func=cmd_docs)

    ex = sub.add_parser("exercise", help="write an exercise skeleton (TODOs and hints) to fill in")
    ex.add_argument("name", help="ring_allreduce, loss_scaler, tensor_parallel, 1f1b, zero1 or "
                    "ring_attention")
    ex.add_argument("--dest", default=".", help="folder to write it into (default: here)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing file")
    ex.set_defaults(func=cmd_exercise)
    ck = sub.add_parser("check", help="grade an exercise: run it through its lab's verification")
    ck.add_argument("name", help="the exercise (see dtlab exercise)")
    ck.add_argument("--impl", default=None, help="your file (default: ./<exercise file>)")
    ck.set_defaults(func=cmd_check)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = make_parser().parse_known_args(argv)
    if rest and not getattr(args, "forwards", False):
        fail(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except UsageError as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
