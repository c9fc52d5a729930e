"""``dtlab bench comm | ddp | cluster | hang | plan``: collectives (collectives.py), our DDP
against torch's (ddp.py), the namespace cluster's links and strategies (cluster.py), the hang
detector (hang.py), the GPU layout search's speed (plan.py). This package's ``add_commands``
holds the flags and imports nothing heavy."""
from __future__ import annotations

from dtlab.launch import add_placement


def cmd_comm(args, rest) -> int:
    from dtlab.bench.collectives import bench_comm  # torch: only when it runs
    return bench_comm(args.nproc, args.json, rest, args.nnodes, args.cluster)


def cmd_ddp(args, rest) -> int:
    from dtlab.bench.ddp import bench_ddp
    return bench_ddp(args.nproc, args.preset, args.steps, args.repeats, args.out, args.variants)


def cmd_cluster(args, rest) -> int:
    from dtlab.bench.cluster import run
    return run(args.out, args.cluster, args.rates, args.train_rates, args.sizes, args.preset,
               args.steps)


def cmd_hang(args, rest) -> int:
    from dtlab.bench.hang import run
    return run(args.json, args.runs, args.faults, args.timeout, args.cluster, args.work)


def cmd_plan(args, rest) -> int:
    from dtlab.bench.plan import run
    return run(args.json, args.repeats, args.top)


def add_commands(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: comm (collectives), ddp (ours vs torch's), "
                       "cluster, hang, plan")
    bsub = b.add_subparsers(dest="bench", required=True)
    bc = bsub.add_parser("comm", help="time collectives, library vs ours, over message sizes",
                         description="Other flags go to dtlab.bench.collectives: --ops, --impl, "
                                     "--sizes, --iters, --warmup.")
    bc.add_argument("--nproc", default="2", help="world sizes, e.g. 2 or 2,4 (default 2)")
    bc.add_argument("--json", default="runs/bench/comm.json", help="where the rows go")
    add_placement(bc)
    bc.set_defaults(func=cmd_comm, forwards=True)
    bd = bsub.add_parser("ddp", help="median step time of our DDP vs torch DDP")
    bd.add_argument("--nproc", type=int, default=2)
    bd.add_argument("--preset", default="small")
    bd.add_argument("--steps", type=int, default=30)
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--out", default="runs/bench/ddp")
    bd.add_argument("--variants", default="all",
                    help="comma list of torch, own-ring, own-library, own-shm (default all; "
                         "torch is always run: the ratios are to it)")
    bd.set_defaults(func=cmd_ddp)
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
    bk.set_defaults(func=cmd_cluster)
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
    bh.set_defaults(func=cmd_hang)
    bp = bsub.add_parser("plan", help="time dtlab plan --gpu's search on the Megatron-LM "
                         "paper's 1T model on 384 x 8 A100")
    bp.add_argument("--repeats", type=int, default=3, help="searches to time (default 3)")
    bp.add_argument("--top", type=int, default=5, help="layouts to keep (default 5)")
    bp.add_argument("--json", default="runs/bench/plan-search-1t.json", help="the record")
    bp.set_defaults(func=cmd_plan)
