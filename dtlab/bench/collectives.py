"""``dtlab bench comm``: time collectives, the library's beside ours, across message sizes.

Run by ``dtlab bench comm`` under torchrun (one launch per world size), or by hand:
    torchrun --nproc_per_node=2 -m dtlab.bench.collectives --impl library,ring --json out.json

For each (op, size): a few warm-up calls, then ``--iters`` timed calls of every implementation in
turn, each preceded by a barrier and a fresh copy of the input (outside the timing). A call's time is the
slowest rank's, since a collective is done only when every rank is done. Every result is checked
exactly: rank r contributes (r + 1) * pattern with small integers, so the sum is exact in fp32.

Figures per row, as nccl-tests defines them:
    algbw = bytes / time
    busbw = algbw * factor, factor = 2(n-1)/n for all_reduce, (n-1)/n for all_gather and
            reduce_scatter, 1 for broadcast
Bus bandwidth is what each link must carry; for a ring it is independent of n, so numbers taken
at different world sizes compare directly.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.table import Table

from dtlab.collectives import ALGORITHMS
from dtlab.collectives.hier import hier_all_reduce
from dtlab.collectives.shm import shm_all_reduce, shm_tensor
from dtlab.train import runtime
from dtlab.measure.comm_counter import RING_FACTORS
from dtlab.errors import UsageError, fail
from dtlab.plotting import plt_agg
from dtlab.costmodel.fitting import fit_line_relative
from dtlab.launch.launcher import Placement, torchrun
from dtlab.measure.run_record import atomic_write_text
from dtlab.report.tables import console, human_bytes

# nccl-tests' bus factors are the ring model's bytes per rank, except broadcast: there the bus
# bandwidth is the algorithm bandwidth (factor 1), the rate at which the message leaves the root.
BUS_FACTOR = {**{op: RING_FACTORS[op] for op in ("all_reduce", "all_gather", "reduce_scatter")},
              "broadcast": lambda n: 1.0}
OPS = tuple(BUS_FACTOR)
OUR_IMPLS = ("ring", "naive", "tree", "shm", "shm-inplace", "hier")  # all_reduce only, dtlab/collectives
DEFAULT_SIZES = "1KiB,16KiB,256KiB,1MiB,4MiB,16MiB,64MiB"


class BenchError(UsageError):
    pass


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|K|M|G)?\s*", text)
    if not m:
        raise BenchError(f"--sizes: cannot read {text!r}; write sizes like 1KiB,4MiB,64MiB")
    unit = (m.group(2) or "B").replace("iB", "").replace("B", "") or "B"
    mult = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit]
    n = int(float(m.group(1)) * mult)
    if n < 4:
        raise BenchError(f"--sizes: {text!r} is smaller than one fp32 element (4 bytes)")
    return n


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if text.strip() == "all":
        return list(allowed)
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise BenchError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from "
                         f"{', '.join(allowed)}")
    return items


def _inputs(op: str, numel: int, world: int, rank: int):
    """(input, output, expected) for one call; integer-valued so results are exact."""
    pattern = (torch.arange(numel) % 7).float()
    if op == "all_reduce":
        return pattern * (rank + 1), None, pattern * (world * (world + 1) / 2)
    if op == "broadcast":
        return (pattern * 3 if rank == 0 else torch.zeros(numel)), None, pattern * 3
    if op == "all_gather":  # numel is the gathered size; each rank contributes numel / world
        per = numel // world
        full = torch.cat([pattern[:per] * (r + 1) for r in range(world)])
        return pattern[:per] * (rank + 1), torch.empty(per * world), full
    per = numel // world  # reduce_scatter: input is the full size, output this rank's share
    full = pattern[:per * world]
    return full * (rank + 1), torch.empty(per), full[rank * per:(rank + 1) * per] * (
        world * (world + 1) / 2)


def _call(op: str, impl: str, x: torch.Tensor, out: torch.Tensor | None,
          shm_dir: str | None = None) -> torch.Tensor:
    if impl == "deepspeed-shm":
        import deepspeed.comm as dscomm  # deepspeed: optional (the deepspeed extra)
        dscomm.inference_all_reduce(x)
        return x
    if impl in ("shm", "shm-inplace"):
        return shm_all_reduce(x, shm_dir=shm_dir)
    if impl == "hier":
        return hier_all_reduce(x)
    if impl != "library":
        return ALGORITHMS[impl](x)
    if op == "all_reduce":
        dist.all_reduce(x)
        return x
    if op == "broadcast":
        dist.broadcast(x, src=0)
        return x
    if op == "all_gather":
        dist.all_gather_into_tensor(out, x)
        return out
    dist.reduce_scatter_tensor(out, x)
    return out


def bench_size(op: str, impls: list[str], nbytes: int, iters: int, warmup: int,
               shm_dir: str | None = None) -> list[dict]:
    """One row per implementation at one size. The implementations take turns call by call,
    so a change in machine load during the measurement hits all of them alike and their
    ratio stays meaningful on a shared, noisy machine."""
    world, rank = dist.get_world_size(), dist.get_rank()
    numel = max(world, nbytes // 4)
    if op in ("all_gather", "reduce_scatter"):
        numel -= numel % world
    src, out, expected = _inputs(op, numel, world, rank)
    times = {impl: [] for impl in impls}
    ok = {impl: True for impl in impls}
    for i in range(warmup + iters):
        for impl in impls:
            x = src.clone()
            if impl == "shm-inplace":  # the tensor lives in this rank's shared buffer
                x = shm_tensor(src.numel(), src.dtype, shm_dir).view_as(src).copy_(src)
            dist.barrier()
            t0 = time.perf_counter()
            res = _call(op, impl, x, out, shm_dir)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[impl].append(dt)
            ok[impl] = ok[impl] and torch.equal(res, expected)
    rows = []
    for impl in impls:
        t = torch.tensor(times[impl], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)      # a call ends when its slowest rank does
        okt = torch.tensor([1 if ok[impl] else 0])
        dist.all_reduce(okt, op=dist.ReduceOp.MIN)
        size, ts = numel * 4, t.tolist()
        med = statistics.median(ts)
        algbw = size / med / 1e9
        rows.append({"op": op, "impl": impl, "world_size": world, "bytes": size,
                     "time_s_median": med, "time_s_min": min(ts), "time_s_max": max(ts),
                     "algbw_GBps": algbw, "busbw_GBps": algbw * BUS_FACTOR[op](world),
                     "ok": bool(okt.item())})
    return rows


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtlab.bench.collectives", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="all_reduce", help=f"comma list of {', '.join(OPS)}, or all")
    p.add_argument("--impl", default="library,ring",
                   help="comma list: library, and for all_reduce ring, naive, tree, shm, "
                        "shm-inplace, hier (ours) and deepspeed-shm (DeepSpeed's CPU "
                        "shared-memory op)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"message sizes (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=int, default=10, help="timed calls per row (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--json", default=None, help="write the rows to this file (rank 0)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--shm-dir", default=None,
                   help="where the shared-memory all-reduce puts its buffers (default /dev/shm)")
    return p


def validate(args) -> tuple[list[str], list[str], list[int]]:
    ops = parse_list(args.ops, OPS, "ops")
    impls = parse_list(args.impl, ("library",) + OUR_IMPLS + ("deepspeed-shm",), "impl")
    if any(i != "library" for i in impls) and ops != ["all_reduce"]:
        ours = ", ".join(i for i in impls if i != "library")
        raise BenchError(f"--impl {ours}: these implement all_reduce only; use --ops all_reduce "
                         "with them, or --impl library for other ops")
    if args.iters < 1 or args.warmup < 0:
        raise BenchError("--iters must be >= 1 and --warmup >= 0")
    return ops, impls, [parse_size(s) for s in args.sizes.split(",") if s.strip()]


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        ops, impls, sizes = validate(args)
    except BenchError as e:
        fail(str(e))
    rt = runtime.init(backend=None, device="cpu", timeout_s=args.timeout)
    if not rt.distributed:
        fail("run the benchmark under torchrun (dtlab bench comm --nproc N does)")
    torch.set_num_threads(1)
    if "deepspeed-shm" in impls:
        # DeepSpeed's CPU shared-memory op reads LOCAL_SIZE (its launcher sets it, torchrun does
        # not); without it the op crashed with SIGSEGV on its first all-reduce here.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
        try:
            import deepspeed  # deepspeed: optional (the deepspeed extra)
        except ImportError:
            fail("--impl deepspeed-shm needs DeepSpeed: pip install -e '.[deepspeed]'")
        deepspeed.init_distributed(dist_backend="gloo")  # builds the shm_comm op on first use
    rows = []
    total = len(ops) * len(impls) * len(sizes)
    try:
        for op in ops:
            for size in sizes:
                for row in bench_size(op, impls, size, args.iters, args.warmup, args.shm_dir):
                    rows.append(row)
                    rt.log(f"[{len(rows):3d}/{total}] {op:<14} {row['impl']:<13} "
                           f"W={row['world_size']} {row['bytes']:>11,d} B  "
                           f"{row['time_s_median'] * 1e3:9.3f} ms  busbw "
                           f"{row['busbw_GBps']:7.3f} GB/s  {'ok' if row['ok'] else 'WRONG'}")
    except UsageError as e:  # every rank raises it together (not enough shared memory)
        if rt.is_main:
            print(f"dtlab: error: {e}", file=sys.stderr, flush=True)
        runtime.shutdown(rt)
        runtime.exit_now(2)
    if rt.is_main and args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    runtime.shutdown(rt)
    runtime.exit_now(0 if all(r["ok"] for r in rows) else 1)  # see runtime.exit_now



# --------------------------------------------------------------------------- model and picture

def fit_alpha_beta(rows: list[dict]) -> list[dict]:
    """Fit of time = alpha + bytes / beta per (op, impl, world size), least squares on relative
    error: alpha is the
    fixed cost of a call (latency, synchronisation), beta the bandwidth the call approaches for
    large messages. For a ring all-reduce the model is 2(p-1) alpha_link + 2(p-1)/p * S / B, so
    this beta is B / (2(p-1)/p): the bus bandwidth the table shows is the comparable number."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["impl"], r["world_size"]), []).append(r)
    fits = []
    for (op, impl, world), rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        x, y = [r["bytes"] for r in rs], [r["time_s_median"] for r in rs]
        alpha, inv_beta = fit_line_relative(x, y)
        rel = max(abs(alpha + inv_beta * xi - yi) / yi for xi, yi in zip(x, y))
        fits.append({"op": op, "impl": impl, "world_size": world, "alpha_s": alpha,
                     "beta_GBps": (1 / inv_beta / 1e9) if inv_beta > 0 else None,
                     "busbw_limit_GBps": (1 / inv_beta / 1e9 * BUS_FACTOR[op](world))
                     if inv_beta > 0 else None, "max_rel_error": rel})
    return fits


def plot_busbw(rows: list[dict], path: Path) -> Path:
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["impl"], r["world_size"]), []).append(r)
    for (op, impl, world), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["bytes"])
        ax.plot([r["bytes"] for r in rs], [r["busbw_GBps"] for r in rs], marker="o",
                label=f"{op} {impl} W={world}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("bus bandwidth vs message size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- dtlab bench comm

def nprocs(text: str) -> list[int]:
    try:
        ns = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"--nproc: {text!r} is not a list of integers; e.g. --nproc 2 or "
                         "--nproc 2,4") from None
    if not ns or min(ns) < 1:
        raise BenchError(f"--nproc must be >= 1, got {text!r}")
    return ns


def bench_comm(nproc: str, json_path: str, rest: list[str], nnodes: int = 1,
               cluster: str = "main") -> int:
    """``dtlab bench comm``: one torchrun per world size (``nproc`` per node, on ``nnodes``
    nodes of the namespace cluster when more than one), rows merged into one JSON record with
    the ratio to the library and the alpha-beta fits, a table and a picture."""
    validate(make_parser().parse_args(rest))
    if nnodes < 1:
        raise BenchError(f"--nnodes must be >= 1, got {nnodes}")
    out = Path(json_path)
    rows = []
    for n in nprocs(nproc):
        part = out.with_name(f".{out.stem}-n{n}x{nnodes}.json")
        rc = torchrun("dtlab.bench.collectives", [*rest, "--json", str(part)],
                      Placement(n, nnodes, cluster), env={"OMP_NUM_THREADS": "1"})
        if rc == 2:  # bad input or not enough shared memory: the ranks said which
            return 2
        if rc != 0 or not part.is_file():
            print(f"dtlab: bench comm on {n} processes failed (exit {rc})", file=sys.stderr)
            return rc or 1
        rows += [{**r, "nnodes": nnodes} for r in json.loads(part.read_text())["rows"]]
        part.unlink()
    lib = {(r["op"], r["world_size"], r["bytes"]): r["busbw_GBps"] for r in rows
           if r["impl"] == "library"}
    for r in rows:
        base = lib.get((r["op"], r["world_size"], r["bytes"]))
        r["busbw_vs_library"] = r["busbw_GBps"] / base if base else None
    fits = fit_alpha_beta(rows)
    png = plot_busbw(rows, out.with_suffix(".png"))
    atomic_write_text(out, json.dumps({"rows": rows, "alpha_beta": fits, "plot": str(png)},
                                      indent=1) + "\n")
    print_tables(rows, fits)
    print(f"rows: {out}   picture: {png}")
    return 0 if all(r["ok"] for r in rows) else 1


def print_tables(rows: list[dict], fits: list[dict]) -> None:
    t = Table(title="dtlab bench comm (busbw = algbw x nccl-tests factor)")
    for c in ("op", "impl", "world", "size", "time ms (median)", "spread ms", "algbw GB/s",
              "busbw GB/s", "vs library", "ok"):
        t.add_column(c, justify="left" if c in ("op", "impl") else "right")
    for r in rows:
        ratio = r["busbw_vs_library"]
        t.add_row(r["op"], r["impl"], str(r["world_size"]), human_bytes(r["bytes"]),
                  f"{r['time_s_median'] * 1e3:.3f}",
                  f"{r['time_s_min'] * 1e3:.2f}-{r['time_s_max'] * 1e3:.2f}",
                  f"{r['algbw_GBps']:.3f}", f"{r['busbw_GBps']:.3f}",
                  "-" if ratio is None else f"{ratio:.2f}x", "ok" if r["ok"] else "WRONG")
    c = console(160)
    c.print(t)
    f = Table(title="alpha-beta model: time = alpha + bytes / beta (least squares over sizes)")
    for col in ("op", "impl", "world", "alpha us", "beta GB/s", "busbw limit GB/s",
                "max rel err"):
        f.add_column(col, justify="left" if col in ("op", "impl") else "right")
    for r in fits:
        f.add_row(r["op"], r["impl"], str(r["world_size"]), f"{r['alpha_s'] * 1e6:.1f}",
                  "-" if r["beta_GBps"] is None else f"{r['beta_GBps']:.3f}",
                  "-" if r["busbw_limit_GBps"] is None else f"{r['busbw_limit_GBps']:.3f}",
                  f"{r['max_rel_error']:.0%}")
    c.print(f)
    c.print("ring model: t = 2(p-1) alpha + 2(p-1)/p * S/B; bus bandwidth divides out the "
            "2(p-1)/p, so it compares across world sizes; across nodes B is the network's "
            "(a few GB/s to 50 GB/s) instead of memory or loopback.")


if __name__ == "__main__":
    sys.exit(main())
