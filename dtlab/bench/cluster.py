"""``dtlab bench cluster``: what the links between nodes do to collectives and to training, on
the namespace cluster, at several link rates, recorded as JSON with pictures.

    sudo dtlab bench cluster --out runs/bench/cluster [--rates 100mbit,1gbit,10gbit,unshaped]

1. Bus bandwidth across 2 nodes at every rate, for gloo and our ring, with 1 and 2 ranks per
   node (``dtlab bench comm --nnodes 2``), beside what the link allows: a ring's crossing edge
   carries 2(W-1)/W of the message one way, and bus bandwidth divides exactly that factor out,
   so the bus bandwidth a shaped link allows is its rate (in bytes/s) whatever W is.
2. Step time and exposed communication per strategy (``dtlab profile compare``) on one node
   (2 ranks in n1) and on 2 nodes (1 rank each) at each of the given training rates.
3. 3D parallelism on 2 nodes x 2 ranks: TP inside a node (tp-inner) against TP across nodes
   (pp-inner), step time and its ratio, at each training rate.

The cluster is left at the rate it had. Needs root and ``dtlab cluster up --nodes 2``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dtlab.cluster.netns import Cluster, rate_bits
from dtlab.errors import UsageError
from dtlab.measure.run_record import atomic_write_text
from dtlab.plotting import plt_agg
from dtlab.launch import sessions

RATES = "100mbit,1gbit,10gbit,unshaped"
TRAIN_RATES = "1gbit,100mbit"
STRATEGIES = [  # (name, lab, flags): a selection of profile compare's
    ("ddp", "ddp", ["--impl", "torch"]),
    ("zero stage 1", "zero", ["--stage", "1"]),
    ("zero stage 3", "zero", ["--stage", "3"]),
    ("tensor parallel", "tensor_parallel", []),
    ("pipeline 1f1b", "pipeline", ["--schedule", "1f1b"]),
]


def _dtlab(*args, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = sessions.run([sys.executable, "-m", "dtlab", *map(str, args)], stdout=f,
                          stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise UsageError(f"`dtlab {' '.join(map(str, args))}` failed (exit {rc}); see {log}")


def set_rate(name: str, rate: str, log: Path) -> None:
    c = Cluster.load(name)
    _dtlab("cluster", "up", "--name", name, "--nodes", c.nodes, "--inter-node", rate,
           "--ranks-per-node", c.ranks_per_node, "--ifnames", ",".join(c.ifnames),
           "--subnet", c.subnet, "--cores-per-node", c.cores_per_node,
           *(["--slurm"] if c.slurm else []),
           *[f"--shm={node}={size}" for node, size in c.shm.items()], log=log)


def _step(out: Path, lab: str, flags: list, nproc: int, nnodes: int, preset: str, steps: int,
          name: str) -> dict:
    run = out / f"{lab}-{'-'.join(map(str, flags)) or 'default'}-{nproc}x{nnodes}"
    _dtlab("profile", lab, "--nproc", nproc, "--nnodes", nnodes, "--cluster", name, *flags,
           "--preset", preset, "--steps", steps, "--out", run, "--no-baseline",
           log=run / "log.txt")
    s = json.loads((run / "summary.json").read_text())
    prof = [r for r in s["extra"]["profile"] if r]
    mean = lambda k: sum(r["share_of_step"][k] for r in prof) / len(prof)  # noqa: E731
    return {"world_size": s["world_size"], "hosts": s["hosts"],
            "step_ms": s["time"]["step_s_median"] * 1e3,
            "comm_bytes_per_step": s["comm"]["bytes_per_step"],
            "communication": mean("communication"),
            "exposed_communication": mean("exposed_communication")}


def run(out: str, name: str = "main", rates: str = RATES, train_rates: str = TRAIN_RATES,
        sizes: str = "1MiB,8MiB", preset: str = "small", steps: int = 8) -> int:
    out = Path(out)
    c = Cluster.load(name)
    if c.nodes < 2:
        raise UsageError(f"cluster {name!r} has {c.nodes} node(s); bring up 2: dtlab cluster up "
                         "--nodes 2")
    original = c.rate or "unshaped"
    record = {"what": __doc__.split("\n\n")[0], "date": time.strftime("%Y-%m-%d"),
              "cluster": {"nodes": c.nodes, "subnet": c.subnet}, "links": [], "strategies": [],
              "parallel3d": []}
    try:
        for rate in [r.strip() for r in rates.split(",") if r.strip()]:
            set_rate(name, rate, out / "logs" / f"rate-{rate}.txt")
            for rpn in (1, 2):
                f = out / f"comm-{rate}-{rpn}pernode.json"
                _dtlab("bench", "comm", "--nnodes", 2, "--nproc", rpn, "--cluster", name,
                       "--impl", "library,ring", "--sizes", sizes, "--iters", 3, "--warmup", 1,
                       "--json", f, log=out / "logs" / f"comm-{rate}-{rpn}.txt")
                bits = rate_bits(None if rate == "unshaped" else rate)
                for r in json.loads(f.read_text())["rows"]:
                    record["links"].append({
                        "rate": rate, "ranks_per_node": rpn, "impl": r["impl"],
                        "world_size": r["world_size"], "bytes": r["bytes"],
                        "busbw_GBps": r["busbw_GBps"],
                        "link_allows_GBps": None if bits is None else bits / 8 / 1e9,
                        "busbw_over_link": None if bits is None else
                        r["busbw_GBps"] / (bits / 8 / 1e9), "ok": r["ok"]})
            print(f"links at {rate}: done", flush=True)
        for rate in [None] + [r.strip() for r in train_rates.split(",") if r.strip()]:
            if rate is not None:
                set_rate(name, rate, out / "logs" / f"rate-{rate}.txt")
            where = "1 node" if rate is None else f"2 nodes @ {rate}"
            for label, lab, flags in STRATEGIES:
                nproc, nnodes = (2, 1) if rate is None else (1, 2)
                if rate is None:  # both ranks inside n1: the node's loopback, no link at all
                    row = _step(out / "one-node", lab, flags, 2, 1, preset, steps, name)
                else:
                    row = _step(out / rate, lab, flags, nproc, nnodes, preset, steps, name)
                record["strategies"].append({"strategy": label, "where": where, **row})
                print(f"{where:<18} {label:<16} {row['step_ms']:8.1f} ms  exposed comm "
                      f"{row['exposed_communication']:.0%}", flush=True)
            if rate is not None:
                rows = {}
                for order in ("tp-inner", "pp-inner"):
                    rows[order] = _step(out / rate, "parallel3d",
                                        ["--dp", 1, "--pp", 2, "--tp", 2, "--order", order], 2,
                                        2, preset, steps, name)
                record["parallel3d"].append({
                    "rate": rate, "tp_inside_node_ms": rows["tp-inner"]["step_ms"],
                    "tp_across_nodes_ms": rows["pp-inner"]["step_ms"],
                    "across_over_inside": rows["pp-inner"]["step_ms"] /
                    rows["tp-inner"]["step_ms"], "rows": rows})
                print(f"3D at {rate}: TP inside a node {rows['tp-inner']['step_ms']:.1f} ms, "
                      f"across nodes {rows['pp-inner']['step_ms']:.1f} ms", flush=True)
    finally:
        set_rate(name, original, out / "logs" / "rate-restore.txt")
    atomic_write_text(out / "cluster.json", json.dumps(record, indent=1) + "\n")
    plot(record, out / "cluster-links.png")
    print(f"record: {out / 'cluster.json'}  picture: {out / 'cluster-links.png'}")
    return 0


def plot(record: dict, path: Path) -> Path:
    plt = plt_agg()
    rows = [r for r in record["links"] if r["bytes"] == max(x["bytes"] for x in record["links"])]
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.2
    series = sorted({(r["impl"], r["ranks_per_node"]) for r in rows})
    for k, (impl, rpn) in enumerate(series):
        vals = [next((r["busbw_GBps"] * 8 for r in rows if r["rate"] == rate and
                      r["impl"] == impl and r["ranks_per_node"] == rpn), 0) for rate in rates]
        ax.bar([i + (k - len(series) / 2 + 0.5) * width for i in range(len(rates))], vals,
               width, label=f"{impl}, {rpn} rank(s)/node")
    for i, rate in enumerate(rates):
        bits = rate_bits(None if rate == "unshaped" else rate)
        if bits:
            ax.plot([i - 0.45, i + 0.45], [bits / 1e9] * 2, "k--", lw=1.5)
    ax.set_xticks(range(len(rates)), rates)
    ax.set_yscale("log")
    ax.set_ylabel("bus bandwidth (Gbit/s)")
    ax.set_title(f"all-reduce of {rows[0]['bytes'] // 2**20} MiB across 2 nodes; dashed: the "
                 "link's rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
