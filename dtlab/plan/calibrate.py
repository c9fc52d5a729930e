"""``dtlab plan calibrate``: measure what the step-time model needs on this machine.

- Compute: one process at a time, with 1 thread and with all cores' threads (what the launcher
  gives a rank: cores // ranks per node), times the forward + backward of ToyGPT's pieces at the
  shapes a layout gives a rank: a block (and its forward alone, what a recomputed block runs
  again), the embedding, the final LayerNorm + head + loss, at 1..B rows a micro-batch and cut
  1, 2 or 4 ways the tensor-parallel lab cuts them (q/k/v and the MLP's first layer by output,
  the projections by input, the head by vocabulary). Each piece's time is fitted as a + c x rows.
  AdamW's step is fitted as a x tensors + c x elements.
- Links: all-reduce, all-gather, reduce-scatter and a pipeline's send/receive pair, 4 KiB to
  2 MiB, each called right after about a millisecond of computation, as training calls them (a
  rank that arrives first sleeps until the others come; ``dtlab bench comm`` times calls after
  a barrier instead), at each world size on this machine, and with ``--cluster-rates`` across
  two nodes of the namespace cluster, one set per rate (the links are shaped in turn and put
  back afterwards). Each (op, world size) is fitted as alpha + bytes / beta.
- What a collective waits in a real step beyond that: a reference run per world size
  (``measure_sync``).

The record (JSON) names itself (``name``: host, cores, date); every prediction names the
calibration it used."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from dtlab.cluster.netns import Cluster
from dtlab.errors import UsageError
from dtlab.costmodel.fitting import fit_line_relative
from dtlab.costmodel.shapes import Shape, share
from dtlab.costmodel.step_time import ClusterSpec, Compute, Layout, Links, shape_key, step_time
from dtlab.launch import sessions

PIECES = ("block_fb", "block_f", "embed_fb", "head_fb")
COMM_SIZES = "4KiB,64KiB,512KiB,2MiB,4MiB"


def _pieces(cfg, tp: int):
    """ToyGPT's block, embedding and head as tensor-parallel rank 0 of ``tp`` holds them."""
    import torch.nn as nn  # torch: the CLI parser imports this
    from dtlab.train.model import Block, Embedding, LMHead
    h = cfg.d_model
    block = Block(cfg)
    if tp > 1:
        hs, fs = share(h, tp, 0), share(cfg.d_ff, tp, 0)
        a = block.attn
        a.q, a.k, a.v = (nn.Linear(h, hs, bias=False) for _ in range(3))
        a.proj = nn.Linear(hs, h)
        a.n_head = cfg.n_head // tp
        a.proj.in_features = hs
        block.mlp.fc, block.mlp.proj = nn.Linear(h, fs), nn.Linear(fs, h)
    head = LMHead(cfg)
    if tp > 1:
        head.head = nn.Linear(h, share(cfg.vocab_size, tp, 0), bias=False)
    return block, Embedding(cfg), head


def _median_time(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fit(xs: list[float], ys: list[float]) -> list[float]:
    """a + c x, neither negative (a piece's fixed cost and its cost a row)."""
    a, c = fit_line_relative(xs, ys)
    return [max(a, 0.0), max(c, 0.0)]


def measure_compute(cfg, rows: list[int], tps: list[int], threads: int, reps: int) -> dict:
    """{tp: {piece: [a, c]}} for one model shape at one thread count (plus the raw times)."""
    import torch  # torch: the CLI parser imports this
    import torch.nn.functional as F
    from dtlab.measure.memory_meter import ActivationMeter
    from dtlab.train.model import ToyGPT, loss_fn
    torch.set_num_threads(threads)
    # The labs count saved activations with a hook that compares each saved tensor with the
    # model's parameters: timed here with it, as the labs run.
    params = list(ToyGPT(cfg).parameters())
    out = {}
    for tp in tps:
        block, emb, head = _pieces(cfg, tp)
        meter = ActivationMeter()
        vocab = head.head.out_features
        raw = {p: [] for p in PIECES}
        for b in rows:
            x = torch.randn(b, cfg.seq_len, cfg.d_model, requires_grad=True)
            idx = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len))
            tgt = torch.randint(0, vocab, (b, cfg.seq_len))
            g = torch.randn(b, cfg.seq_len, cfg.d_model)

            def block_fb():
                block(x).backward(g)

            def block_f():
                with torch.enable_grad():
                    block(x)

            def embed_fb():
                emb(idx).backward(g)

            def head_fb():
                loss = loss_fn(head(x), tgt) if tp == 1 else \
                    F.cross_entropy(head(x).reshape(-1, vocab), tgt.reshape(-1))
                loss.backward()

            for name, fn in (("block_fb", block_fb), ("block_f", block_f),
                             ("embed_fb", embed_fb), ("head_fb", head_fb)):
                def metered(fn=fn):
                    with meter.measure(params):
                        fn()
                raw[name].append(_median_time(metered, reps))
        out[str(tp)] = {p: _fit([float(b) for b in rows], raw[p]) for p in PIECES}
        out[str(tp)]["raw_s"] = {p: dict(zip(map(str, rows), raw[p])) for p in PIECES}
    return out


def measure_optimizer(threads: int, reps: int) -> list[float]:
    """AdamW (the labs' settings) step time = a x tensors + c x elements, fitted on several
    tensor counts and sizes."""
    import torch  # torch: the CLI parser imports this
    torch.set_num_threads(threads)
    X, y = [], []
    for count, numel in ((2, 1 << 10), (8, 1 << 12), (16, 1 << 14), (6, 1 << 17), (30, 1 << 15),
                         (4, 1 << 19)):
        ps = [torch.nn.Parameter(torch.randn(numel)) for _ in range(count)]
        for p in ps:
            p.grad = torch.randn(numel)
        opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        y.append(_median_time(opt.step, reps))
        X.append((count, count * numel))
    A = torch.tensor(X, dtype=torch.float64)
    t = torch.tensor(y, dtype=torch.float64)
    sol = torch.linalg.lstsq(A / t.unsqueeze(1), torch.ones_like(t).unsqueeze(1)).solution[:, 0]
    return [max(float(sol[0]), 0.0), max(float(sol[1]), 0.0)]


CTX_SIZES = (4 << 10, 64 << 10, 512 << 10, 2 << 20)
CTX_OPS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


# Matmuls of computation between two calls (about 0.7 ms here). The record keeps one fit per
# gap and the planner interpolates between gaps, but 0.1, 0.4 and 1.5 ms gave no systematic
# difference on this machine (the spread between calibrations was larger), so one is timed.
GAPS = (16,)


def worker(out: str, iters: int = 20) -> int:
    """Under torchrun: every op at every size, each call right after some computation (as in
    training, where ranks reach a collective at slightly different times and a rank that waits
    has gone to sleep), never after a barrier, after each amount of computation in ``GAPS``
    (tensor parallelism calls every few hundred microseconds, DDP once a step). A
    call's time is the mean over ranks of the median; ``p2p`` is a send from rank r to rank
    r + W/2 and one back (a pipeline's two messages), halved."""
    import torch  # torch: the CLI parser imports this
    import torch.distributed as dist
    from dtlab.train import runtime
    warnings.filterwarnings("ignore", category=FutureWarning)  # the *_tensor names the labs use
    rt = runtime.init("gloo", "cpu")
    W, r = rt.world_size, rt.rank
    a = torch.randn(96, 96) / 10

    def work(n):
        x = a
        for _ in range(n):
            x = torch.tanh(x @ a)
        return x

    rows = []
    for gap in GAPS:
        gap_s = _median_time(lambda: work(gap), 9)
        for op in CTX_OPS:
            if op == "p2p" and W % 2:
                continue
            for size in CTX_SIZES:
                k = max(1, size // 4 // W)
                n = k * W
                x = torch.ones(n)
                out_t = torch.empty(n)
                times = []
                for i in range(iters + 3):
                    x.fill_(1.0)
                    work(gap)
                    t0 = time.perf_counter()
                    if op == "all_reduce":
                        dist.all_reduce(x)
                    elif op == "all_gather":
                        dist.all_gather_into_tensor(out_t, x[:k])
                    elif op == "reduce_scatter":
                        dist.reduce_scatter_tensor(out_t[:k], x)
                    else:   # pairs half a world apart: across nodes on 2 nodes
                        peer = (r + W // 2) % W
                        if r < W // 2:
                            dist.send(x, peer)
                            dist.recv(x, peer)
                        else:
                            dist.recv(x, peer)
                            dist.send(x, peer)
                    dt = time.perf_counter() - t0
                    if i >= 3:
                        times.append(dt / (2 if op == "p2p" else 1))
                med = torch.tensor([statistics.median(times), gap_s], dtype=torch.float64)
                dist.all_reduce(med)
                rows.append({"op": op, "world_size": W, "bytes": size, "gap_s": float(med[1]) / W,
                             "time_s": float(med[0]) / W})
    if r == 0:
        Path(out).write_text(json.dumps({"rows": rows}))
    runtime.shutdown(rt)
    return 0


def _bench_links(nproc: str, nnodes: int, cluster: str, label: str) -> dict:
    """Fits {op: {world: [[gap_s, alpha_s, beta_Bps], ...]}} of collectives called in a
    compute loop, one per gap."""
    from dtlab.launch.launcher import Placement, torchrun  # torch: the CLI parser imports this
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        for n in (int(x) for x in nproc.split(",")):
            path = Path(d) / f"ctx{n}.json"
            rc = torchrun("dtlab.plan.calibrate", ["--worker", str(path)],
                          Placement(n, nnodes, cluster), env={"OMP_NUM_THREADS": "1"})
            if rc != 0 or not path.is_file():
                raise UsageError(f"calibrating the {label} links on {n} x {nnodes} processes "
                                 f"failed (exit {rc})")
            rows = json.loads(path.read_text())["rows"]
            for op in CTX_OPS:
                for gap in sorted({x["gap_s"] for x in rows if x["op"] == op}):
                    rs = [x for x in rows if x["op"] == op and x["gap_s"] == gap]
                    a, c = _fit([x["bytes"] for x in rs], [x["time_s"] for x in rs])
                    world = str(rs[0]["world_size"])
                    beta = 1 / c if c > 0 else float("inf")
                    out.setdefault(op, {}).setdefault(world, []).append([gap, a, beta])
                    print(f"  {label} {op:14s} W={world} gap {gap * 1e3:5.2f} ms: alpha "
                          f"{a * 1e6:7.0f} us, beta {beta / 1e9:6.2f} GB/s", flush=True)
    return out


def calibrate(args) -> int:
    import torch  # torch: the CLI parser imports this
    from dtlab.train.data import ARITH_VOCAB
    from dtlab.train.model import config_from_preset, preset
    cores = os.cpu_count() or 1
    if args.max_ranks < 2:
        raise UsageError(f"--max-ranks must be >= 2 (links need two ranks), got {args.max_ranks}")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    threads = sorted({1, cores})
    date = datetime.date.today().isoformat()
    rec = {"name": f"{socket.gethostname()}-{cores}cores-{date}", "date": date,
           "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
           "cores": cores, "torch": torch.__version__, "python": platform.python_version(),
           "compute": {}, "optimizer": {}, "links": {}}
    t0 = time.perf_counter()
    for name in presets:
        try:
            cfg = config_from_preset(name, len(ARITH_VOCAB))
        except KeyError as e:
            raise UsageError(f"--presets: {e.args[0]}") from None
        batch = preset(name)["batch_size"]
        rows = sorted({1, 2, 4, 8, batch} | ({16} if batch >= 16 else set()))
        rows = [r for r in rows if r <= batch]
        tps = [t for t in (1, 2, 4) if cfg.n_head % t == 0]
        key = shape_key(cfg.d_model, cfg.n_head, cfg.d_ff, cfg.seq_len, cfg.vocab_size)
        for th in threads:
            print(f"compute: preset {name} ({key}), {th} thread(s), rows {rows}, tp {tps} ...",
                  flush=True)
            rec["compute"].setdefault(key, {})[str(th)] = measure_compute(cfg, rows, tps, th,
                                                                         args.reps)
    for th in threads:
        rec["optimizer"][str(th)] = measure_optimizer(th, args.reps)
    torch.set_num_threads(cores)
    print(f"compute calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    worlds = ",".join(str(w) for w in range(2, args.max_ranks + 1))
    print(f"links on this machine: world sizes {worlds} ...", flush=True)
    rec["links"]["host"] = _bench_links(worlds, 1, args.cluster, "host")
    rec["sync_s"] = measure_sync(rec, args.max_ranks, args.reps)
    if args.cluster_rates:
        rec["links"].update(calibrate_cluster(args))
    out = Path(args.out)
    from dtlab.measure.run_record import atomic_write_text  # torch: the CLI parser imports this
    atomic_write_text(out, json.dumps(rec, indent=1) + "\n")
    print(f"calibration {rec['name']!r} written to {out} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


SYNC_SEQ = 16   # the reference runs' sequence: a shape no validation layout uses


def measure_sync(rec: dict, max_ranks: int, reps: int) -> dict:
    """What a collective costs in a real training step beyond its alpha-beta fit: ranks reach
    it at times that differ by the Python and scheduling noise of everything before it, and the
    first one waits. One reference run a world size (ZeRO-3, tiny preset at sequence 16: 12
    collectives a step, batch 12), its step predicted without this term; the difference over the
    calls is the term, added to every collective of that many ranks."""
    from dtlab.train.data import ARITH_VOCAB  # torch: the CLI parser imports this
    from dtlab.train.model import config_from_preset
    cfg = config_from_preset("tiny", len(ARITH_VOCAB), seq_len=SYNC_SEQ)
    key = shape_key(cfg.d_model, cfg.n_head, cfg.d_ff, cfg.seq_len, cfg.vocab_size)
    rec["compute"][key] = {str(th): measure_compute(cfg, [1, 2, 4, 6, 12], [1], th, reps)
                           for th in sorted({1, rec["cores"]})}
    m = Shape(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.vocab_size, cfg.seq_len)
    out = {}
    work = Path(tempfile.mkdtemp(prefix="dtlab-sync-"))
    try:
        for w in range(2, max_ranks + 1):
            spec = ClusterSpec(nodes=1, per_node=w, cores=rec["cores"])
            t = step_time(m, 12, Layout(dp=w, zero=3), spec, Compute(m, spec, rec),
                          Links(spec, rec))
            measured = []
            for i in range(2 if reps >= 5 else 1):   # two runs of 30 steps, when not in a hurry
                run = work / f"zero3-{w}-{i}"
                cmd = [sys.executable, "-m", "dtlab", "run", "zero", "--stage", "3", "--nproc",
                       str(w), "--preset", "tiny", "--seq-len", str(SYNC_SEQ), "--batch-size",
                       "12", "--steps", str(30 if reps >= 5 else 12), "--no-baseline",
                       "--out", str(run)]
                p = sessions.run(cmd, capture_output=True, text=True, timeout=300)
                if p.returncode != 0:
                    raise UsageError(f"calibration reference run failed: {' '.join(cmd[2:])}: "
                                     f"{(p.stderr or p.stdout)[-400:]}")
                summary = json.loads((run / "summary.json").read_text())
                measured.append(summary["time"]["step_s_median"])
            calls = 3 * (m.n_layer + 2)
            mean = statistics.fmean(measured)
            out[str(w)] = max(0.0, (mean - t["total"]) / calls)
            rec.setdefault("sync_runs_s", {})[str(w)] = measured
            print(f"  reference ZeRO-3 step on {w} ranks: measured "
                  f"{', '.join(f'{x * 1e3:.2f}' for x in measured)} ms, alpha-beta "
                  f"{t['total'] * 1e3:.2f} ms: {out[str(w)] * 1e6:.0f} us more a collective",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def calibrate_cluster(args) -> dict:
    """Inter-node fits at each rate: 2 nodes x 1 and 2 x 2 ranks, the links shaped in turn and
    put back to the rate they had."""
    from dtlab.bench.cluster import set_rate  # torch: the CLI parser imports this
    before = Cluster.load(args.cluster).rate or "unshaped"  # says how to bring one up if none
    out = {}
    log = Path(tempfile.gettempdir()) / "dtlab-plan-cluster.log"   # dtlab cluster up output
    try:
        for rate in [r.strip() for r in args.cluster_rates.split(",") if r.strip()]:
            set_rate(args.cluster, rate, log)
            print(f"links between nodes at {rate} ...", flush=True)
            fits: dict = {}
            for per_node in (1, 2):
                for op, by_world in _bench_links(str(per_node), 2, args.cluster,
                                                 f"{rate} inter-node").items():
                    fits.setdefault(op, {}).update(by_world)
            out[f"inter@{rate}"] = fits
    finally:
        set_rate(args.cluster, before, log)
    return out


def add_arguments(p) -> None:
    p.add_argument("--presets", default="tiny,small,long",
                   help="model shapes to time (default tiny,small,long)")
    p.add_argument("--max-ranks", type=int, default=4,
                   help="largest world size whose links are timed on this machine (default 4)")
    p.add_argument("--cluster", default="main", help="namespace cluster for --cluster-rates")
    p.add_argument("--cluster-rates", default="",
                   help="also time the links between 2 nodes of the namespace cluster at these "
                        "rates, e.g. 100mbit,1gbit,unshaped (root; default: none)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions a point (default 7)")
    p.add_argument("--out", default="runs/plan/calibration.json",
                   help="where the calibration goes (default runs/plan/calibration.json)")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dtlab.plan.calibrate")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    add_arguments(ap)
    a = ap.parse_args()
    sys.exit(worker(a.worker) if a.worker else calibrate(a))
