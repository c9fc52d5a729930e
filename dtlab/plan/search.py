"""``dtlab plan``: which layout to run, what each one needs per device and how long its step takes.

For a model (a preset, or --layers/--d-model/--heads/--seq/--vocab, or --params), a global batch
and a cluster (nodes, devices per node, device memory, compute speed, links), every layout in the
search (dp x tp x pp x cp, ZeRO stage and offload, recomputation, micro-batches, schedule) is
costed from the shapes alone by :mod:`dtlab.costmodel.step_time` (memory by category, step time by
part), the ones that fit are ranked fastest first, each runner-up gets the part of the step where
it loses most to the best, and the best gets the command that runs it. ``calibrate``
(dtlab/plan/calibrate.py) measures this machine; ``validate`` (dtlab/plan/validate.py) runs
layouts and holds the predictions against them.

Standard library only, but for ``--preset`` (the presets live with the model) and calibration.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from dtlab.costmodel import shapes as cm
from dtlab.errors import UsageError
from dtlab.costmodel.step_time import (GiB, ClusterSpec, Compute, Layout, Link, Links, PlanError,
                                 divisors, invalid, load_calibration, predict)
from dtlab.plan import calibrate as plancal, validate as planval
from dtlab.report.tables import console


def check_cluster(c: ClusterSpec, calib: dict | None) -> None:
    """A description that contradicts itself is refused with what to change."""
    for name, v in (("--nodes", c.nodes), ("--devices-per-node", c.per_node)):
        if v < 1:
            raise PlanError(f"{name} must be >= 1, got {v}")
    if not c.memory > 0:
        raise PlanError(f"--device-memory must be > 0, got {c.memory}")
    if c.peak_flops is not None and not c.peak_flops > 0:
        raise PlanError(f"--peak-flops must be > 0, got {c.peak_flops}")
    if not c.pcie > 0:
        raise PlanError(f"--pcie must be > 0, got {c.pcie / 1e9:g}")
    if not 0 < c.efficiency <= 1:
        raise PlanError(f"--efficiency is a share of the peak in (0, 1], got {c.efficiency}")
    if c.nodes == 1 and c.inter is not None:
        raise PlanError("--inter describes links between nodes, but --nodes is 1: drop --inter "
                        "or give --nodes > 1")
    if c.nodes > 1 and c.inter is None and not (calib and f"inter@{c.rate}" in calib["links"]):
        have = sorted(k for k in (calib or {}).get("links", {}) if k.startswith("inter@"))
        raise PlanError(f"--nodes {c.nodes} needs the links between nodes: give --inter "
                        "ALPHA_US,GBPS" + (f", or --rate one of {', '.join(h[6:] for h in have)}"
                                           if have else " or a calibration with --cluster-rates"))
    if c.inter and c.intra and c.inter.bytes_per_s / c.per_node > c.intra.bytes_per_s:
        raise PlanError(f"--inter ({c.inter.bytes_per_s / 1e9:g} GB/s for the node's "
                        f"{c.per_node} devices) gives each device more than --intra "
                        f"({c.intra.bytes_per_s / 1e9:g} GB/s): links between nodes are not "
                        "faster than inside one; check the units (GB/s, one direction)")
    if calib is None and c.peak_flops is None:
        raise PlanError("give the devices' speed: --peak-flops (a datasheet figure) or "
                        "--calibration FILE (dtlab plan calibrate)")
    if calib is None and c.intra is None and c.world > 1:
        raise PlanError("give the links inside a node: --intra ALPHA_US,GBPS, or --calibration")


# ---------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class Search:
    dp: tuple[int, ...] | None = None
    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    cp: tuple[int, ...] = (1,)
    zero: tuple[int, ...] = (0, 1, 2, 3)
    offload: tuple[str, ...] = ("none", "optimizer")
    recompute: tuple[str, ...] = ("none", "selective", "full")
    microbatches: tuple[int, ...] = (1, 2, 4, 8)
    schedules: tuple[str, ...] = ("1f1b", "gpipe")


def layouts(m: cm.Shape, batch: int, c: ClusterSpec, s: Search) -> tuple[list, list]:
    """Every layout the search names: (runnable, [(layout, why not)])."""
    ok, bad = [], []
    W = c.world
    for tp, pp, cp in itertools.product(s.tp or divisors(W), s.pp or divisors(W), s.cp):
        if W % (tp * pp * cp):
            continue
        dp = W // (tp * pp * cp)
        if s.dp and dp not in s.dp:
            continue
        for zero, off, rc, M, sched in itertools.product(
                s.zero, s.offload, s.recompute, s.microbatches if pp > 1 else (1,),
                s.schedules if pp > 1 else ("1f1b",)):
            lay = Layout(dp, tp, pp, cp, zero, off, rc, M, sched)
            why = invalid(m, batch, lay, c)
            if why is None:
                ok.append(lay)
            elif not why.startswith(("offload needs", "micro-batches are", "ZeRO runs")):
                bad.append((lay, why))
    return ok, bad


def _why_slower(best: dict, other: dict) -> str:
    """The part of the step where ``other`` loses most time to ``best``."""
    tb, to = best["time"], other["time"]
    parts = {"compute": to["compute"] - tb["compute"],
             "optimizer step": to["optimizer"] - tb["optimizer"],
             "pipeline bubble": to["bubble"] - tb["bubble"]}
    names = {"dp": "gradient all-reduce/ZeRO collectives", "tp": "TP all-reduces",
             "pp": "pipeline sends", "cp": "ring-attention K/V passes"}
    for k, v in to["comm"].items():
        parts[names[k]] = v - tb["comm"][k]
    worst = max(parts, key=parts.get)
    if parts[worst] <= 1e-4 * tb["total"]:
        return (f"same time, {(other['memory']['total'] - best['memory']['total']) / 2**20:+.1f}"
                " MiB a device")
    return f"+{parts[worst] * 1e3:.2f} ms {worst}"


def plan(m: cm.Shape, batch: int, c: ClusterSpec, s: Search, calib: dict | None) -> dict:
    check_cluster(c, calib)
    comp, links = Compute(m, c, calib), Links(c, calib)
    cands, bad = layouts(m, batch, c, s)
    if not cands:
        why = sorted({w for _, w in bad}) or ["the search names no layout"]
        raise PlanError(f"no layout of {c.world} devices can run this model and batch: "
                        + "; ".join(why[:4]))
    if comp.table is not None:   # cuts the calibration has not timed cannot be predicted
        bad += [(lay, f"the calibration has no tp={lay.tp} timings") for lay in cands
                if str(lay.tp) not in comp.table]
        cands = [lay for lay in cands if str(lay.tp) in comp.table]
        if not cands:
            raise PlanError(f"calibration {calib['name']!r} has timed none of the tensor-"
                            "parallel cuts this cluster needs; calibrate again or give "
                            "--peak-flops")
    preds = [predict(m, batch, lay, c, comp, links) for lay in cands]
    # fastest first; at the same time (to the nanosecond), the leaner one
    fit = sorted((p for p in preds if p["fits"]),
                 key=lambda p: (round(p["time"]["total"], 9), p["memory"]["total"]))
    if not fit:
        least = min(preds, key=lambda p: p["memory"]["total"])
        raise PlanError(
            f"the model fits nowhere: the leanest layout ({least['label']}) needs "
            f"{least['memory']['total'] / GiB:.2f} GiB a device, the devices have "
            f"{c.memory / GiB:.2f} GiB; add devices or memory, or allow ZeRO 3, offload and "
            "full recomputation in the search")
    best = fit[0]
    for p in fit[1:]:
        p["why_not_best"] = _why_slower(best, p)
    over = [p for p in preds if not p["fits"]]
    return {"model": asdict(m), "batch": batch, "cluster": _cluster_json(c),
            "compute_source": comp.source,
            "calibration": calib["name"] if calib else None,
            "threads_per_rank": comp.threads, "core_slowdown": comp.slowdown,
            "ranked": fit, "too_big": len(over), "not_runnable": len(bad)}


def _cluster_json(c: ClusterSpec) -> dict:
    d = asdict(c)
    return d


# ---------------------------------------------------------------------------- command line
def parse_link(text: str | None, flag: str) -> Link | None:
    if not text:
        return None
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise PlanError(f"{flag} {text!r}: give ALPHA_US,GBPS, e.g. 5,25 (5 us a message "
                        "step, 25 GB/s one direction)") from None
    if a < 0 or b <= 0:
        raise PlanError(f"{flag} {text!r}: latency must be >= 0 and bandwidth > 0")
    return Link(a * 1e-6, b * 1e9)


def parse_ints(text: str | None, flag: str, lo: int = 1, hi: int | None = None
               ) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise PlanError(f"{flag} {text!r}: give whole numbers, e.g. 1,2,4") from None
    if min(vals) < lo or (hi is not None and max(vals) > hi):
        raise PlanError(f"{flag} {text!r}: each must be " +
                        (f"{lo}..{hi}" if hi is not None else f">= {lo}"))
    return vals


def parse_words(text: str, flag: str, allowed) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in text.split(",") if x.strip())
    for v in vals:
        if v not in allowed:
            raise PlanError(f"{flag}: {v!r} is not one of {', '.join(allowed)}")
    return vals


def parse_bytes(text: str, flag: str) -> float:
    mt = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GiB|MiB|GB|MB|G|M)?\s*", text or "")
    if not mt:
        raise PlanError(f"{flag} {text!r}: give a size such as 80GiB or 512MiB")
    unit = {"GiB": GiB, "G": GiB, "GB": 1e9, "MiB": 2**20, "M": 2**20, "MB": 1e6}
    return float(mt.group(1)) * unit.get(mt.group(2) or "GiB")


def model_from_args(a) -> tuple[cm.Shape, int, str | None]:
    """The model shape, the global batch and the preset (None for a described model)."""
    described = [a.layers, a.d_model, a.heads]
    if a.preset and any(described + [a.ffn, a.vocab, a.params]):
        raise PlanError("give the model either as --preset (with --seq and --batch if you "
                        "like) or as --layers/--d-model/--heads/--ffn/--vocab or --params, "
                        "not both")
    if a.preset:
        from dtlab.train.model import preset_shape  # torch: only for a preset
        m, batch = preset_shape(a.preset, a.seq)
        return m, a.batch or batch, a.preset
    if a.params and not any(described):
        # a GPT-like shape of about that many parameters (12 d^2 a block): width about 128 x
        # layers, rounded to a multiple of 1024, heads of 128
        n = float(a.params)
        d = max(1024, round(128 * (n / (12 * 128**2)) ** (1 / 3) / 1024) * 1024)
        layers = max(2, round(n / (12 * d * d)))
        m = cm.Shape(layers, d, d // 128, 4 * d, a.vocab or 50257, a.seq or 2048)
        return m, a.batch or 8, None
    if not all(described):
        raise PlanError("give the model: --preset small, or --layers L --d-model H --heads A "
                        "[--ffn F --vocab V --seq S], or --params 7e9")
    if a.d_model % a.heads:
        raise PlanError(f"--d-model {a.d_model} is not a multiple of --heads {a.heads}")
    m = cm.Shape(a.layers, a.d_model, a.heads, a.ffn or 4 * a.d_model, a.vocab or 50257,
                 a.seq or 2048)
    return m, a.batch or 8, None


def spec_from_args(a, calib: dict | None) -> ClusterSpec:
    cores = a.cores if a.cores is not None else (calib["cores"] if calib else 0)
    return ClusterSpec(nodes=a.nodes, per_node=a.devices_per_node,
                       memory=parse_bytes(a.device_memory or "24GiB", "--device-memory"),
                       peak_flops=a.peak_flops, efficiency=a.efficiency,
                       intra=parse_link(a.intra, "--intra"), inter=parse_link(a.inter, "--inter"),
                       cores=cores, shared_cores=a.shared_cores, rate=a.rate,
                       pcie=a.pcie * 1e9)


def search_from_args(a) -> Search:
    return Search(dp=parse_ints(a.dp, "--dp"), tp=parse_ints(a.tp, "--tp"),
                  pp=parse_ints(a.pp, "--pp"), cp=parse_ints(a.cp, "--cp") or (1,),
                  zero=parse_ints(a.zero, "--zero", 0, 3) or (0,),
                  offload=parse_words(a.offload, "--offload", ("none", "optimizer", "param")),
                  recompute=parse_words(a.recompute, "--recompute",
                                        ("none", "selective", "full")),
                  microbatches=parse_ints(a.microbatches, "--microbatches") or (1,),
                  schedules=parse_words(a.schedules, "--schedules", ("1f1b", "gpipe")))


def command_for(lay: Layout, preset: str | None, batch: int, c: ClusterSpec,
                seq: int | None = None) -> str:
    """The command that runs the layout with dtlab's labs (they train presets only: for a
    described model, the layout to set in your framework)."""
    lab, flags = lay.lab_args()
    if preset is None:
        return (f"{lay.label()} on {c.nodes} node(s) x {c.per_node} (dtlab's labs train its "
                f"presets only; with one: dtlab's {lab} lab, flags {' '.join(flags) or 'none'})")
    model = [f"--preset {preset}"] + ([f"--seq-len {seq}"] if seq else [])
    if c.nodes > 1 and not c.shared_cores:
        return (f"NPROC_PER_NODE={c.per_node} sbatch -N {c.nodes} slurm/torchrun.sbatch {lab} "
                + " ".join([*model, f"--batch-size {batch}", *flags]))
    nnodes = [f"--nnodes {c.nodes}"] if c.nodes > 1 else []
    return " ".join(["dtlab run", lab, f"--nproc {c.per_node}", *nnodes, *model,
                     f"--batch-size {batch}", *flags])


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def print_plan(res: dict, top: int, preset: str | None) -> None:
    from rich.table import Table  # rich: start-up (the CLI parser imports this)
    m = res["model"]
    print(f"model: {m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} heads, ffn "
          f"{m['d_ff']}, vocab {m['vocab']}, seq {m['seq']}; global batch {res['batch']}")
    c = res["cluster"]
    print(f"cluster: {c['nodes']} node(s) x {c['per_node']} device(s), "
          f"{c['memory'] / GiB:.2f} GiB a device; compute: {res['compute_source']}"
          + (f"; {res['threads_per_rank']} thread(s) a rank, ranks sharing cores slowed "
             f"x{res['core_slowdown']:.2f}" if c["cores"] else ""))
    t = Table(title=f"predicted, fastest first ({len(res['ranked'])} layouts fit; "
                    f"{res['too_big']} too big)")
    for col in ("#", "layout", "GiB/dev", "params/grads/optim/act MiB", "step ms", "compute",
                "optim", "bubble", "comm dp/tp/pp/cp", "why slower than #1"):
        t.add_column(col)
    for i, p in enumerate(res["ranked"][:top], 1):
        mem, tm = p["memory"], p["time"]
        mib = "/".join(f"{mem[k] / 2**20:.1f}" for k in ("params", "grads", "optimizer",
                                                         "activations"))
        cm_ = "/".join(_ms(tm["comm"][k]) for k in ("dp", "tp", "pp", "cp"))
        t.add_row(str(i), p["label"], f"{mem['total'] / GiB:.3f}", mib, _ms(tm["total"]),
                  _ms(tm["compute"]), _ms(tm["optimizer"]), _ms(tm["bubble"]), cm_,
                  p.get("why_not_best", "best"))
    console(200).print(t)
    print(f"run the best: {res['command']}")
    print("figures are predictions" + (f" from calibration {res['calibration']}"
                                        if res["calibration"] else "") + ", not measurements")


def run(a) -> int:
    if getattr(a, "gpu", None):
        if a.action != "search":
            raise PlanError(f"--gpu goes with the search ('dtlab plan --gpu NAME ...'), not "
                            f"{a.action!r}")
        return run_gpu(a)
    if a.action == "calibrate":
        return plancal.calibrate(a)
    if a.action == "validate":
        return planval.validate(a)
    calib = load_calibration(a.calibration)
    m, batch, preset = model_from_args(a)
    if batch < 1:
        raise PlanError(f"--batch must be >= 1, got {batch}")
    c = spec_from_args(a, calib)
    res = plan(m, batch, c, search_from_args(a), calib)
    best = Layout(**res["ranked"][0]["layout"])
    res["command"] = command_for(best, preset, batch, c, a.seq if preset else None)
    if a.json:
        from dtlab.measure.run_record import atomic_write_text  # torch: the CLI parser imports this
        atomic_write_text(Path(a.json), json.dumps(res, indent=1) + "\n")
    print_plan(res, a.top or 12, preset)
    if a.json:
        print(f"record: {a.json}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("action", nargs="?", default="search", choices=("search", "calibrate",
                                                                  "validate"),
                   help="search (default): rank the layouts; calibrate: time this machine; "
                        "validate: run layouts and compare with the predictions")
    g = p.add_argument_group("the model (search)")
    g.add_argument("--preset", help="tiny, small, long, gpt2-124m")
    g.add_argument("--layers", type=int)
    g.add_argument("--d-model", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--ffn", type=int, help="MLP width (default 4 x d-model)")
    g.add_argument("--vocab", type=int, help="vocabulary (default 50257)")
    g.add_argument("--seq", type=int, help="sequence length (default: preset's, or 2048)")
    g.add_argument("--params", type=float, help="or only a parameter count: a GPT-like shape")
    g.add_argument("--batch", type=int, help="global batch in sequences (default: preset's or 8)")
    g.add_argument("--kv-heads", type=int, help="--gpu: key/value heads (grouped-query "
                   "attention; default --heads)")
    g.add_argument("--arch", choices=("gpt", "llama"), default="gpt",
                   help="--gpu: block style, gpt (LayerNorm, GELU MLP, learned positions; "
                        "default) or llama (RMSNorm, SwiGLU, rotary)")
    g.add_argument("--tied", action="store_true", help="--gpu: embeddings tied to the head")
    k = p.add_argument_group("the cluster (search)")
    k.add_argument("--nodes", type=int, default=1)
    k.add_argument("--devices-per-node", type=int, default=2, help="ranks a node (default 2)")
    k.add_argument("--device-memory", default=None,
                   help="per device (default 24GiB; with --gpu the GPU's)")
    k.add_argument("--peak-flops", type=float, help="a device's peak FLOP/s (datasheet) when "
                   "there is no calibration of the model's shape")
    k.add_argument("--efficiency", type=float, default=0.4,
                   help="share of --peak-flops a step reaches (default 0.4, an assumption)")
    k.add_argument("--intra", help="a device's link inside a node: ALPHA_US,GBPS (one "
                   "direction)")
    k.add_argument("--inter", help="a node's link to the others: ALPHA_US,GBPS (one direction, "
                   "all its devices together: 8 x 25 GB/s adapters are 200)")
    k.add_argument("--pcie", type=float, default=25.0,
                   help="GB/s between a device and its host, for offload's copies (default 25: "
                        "an assumption near PCIe 4.0 x16's 31.5 GB/s)")
    k.add_argument("--calibration", help="a dtlab plan calibrate record (compute and links)")
    k.add_argument("--rate", default="unshaped",
                   help="which calibrated inter-node rate to use (default unshaped)")
    k.add_argument("--cores", type=int, default=None,
                   help="CPU cores a node's ranks share (default: the calibration's)")
    k.add_argument("--shared-cores", action="store_true",
                   help="every node shares the same cores (the namespace cluster)")
    s = p.add_argument_group("what to search (comma lists; default: every divisor)")
    s.add_argument("--dp")
    s.add_argument("--tp")
    s.add_argument("--pp")
    s.add_argument("--cp", default="1")
    s.add_argument("--zero", default="0,1,2,3")
    s.add_argument("--offload", default="none,optimizer")
    s.add_argument("--recompute", default="none,selective,full")
    s.add_argument("--microbatches", default="1,2,4,8")
    s.add_argument("--schedules", default="1f1b,gpipe")
    s.add_argument("--mbs", help="--gpu: micro-batch sizes (default: every divisor of a DP "
                   "rank's share of the batch)")
    s.add_argument("--interleave", default="1,2,4",
                   help="--gpu: model chunks a pipeline rank, interleaved 1F1B (default 1,2,4)")
    s.add_argument("--sp", default="off,on", help="--gpu: sequence parallelism (default off,on)")
    k.add_argument("--gpu", metavar="NAME", help="plan on the GPU step model for this GPU "
                   "(H100, H200, A100): its datasheet fills --device-memory, --peak-flops, "
                   "--intra and --inter unless given")
    p.add_argument("--top", type=int, default=None,
                   help="rows of the table (default 12; with --gpu 5)")
    p.add_argument("--json", help="search: write the whole ranking here; validate: the record "
                   "(default runs/plan/validate.json)")
    v = p.add_argument_group("calibrate and validate")
    plancal.add_arguments(v)
    planval.add_arguments(v)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dtlab plan", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except UsageError as e:
        print(f"dtlab plan: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------- --gpu
def gpu_cluster_from_args(a):
    """The GPU (the datasheet's figures, the user's where given) and the cluster."""
    from dtlab.costmodel import gpu_step as gs
    from dtlab.costmodel.gpus import gpu as gpu_named
    from dtlab.plan import gpu_search
    g = gpu_named(a.gpu)
    intra, inter = parse_link(a.intra, "--intra"), parse_link(a.inter, "--inter")
    if a.peak_flops is not None and not a.peak_flops > 0:
        raise PlanError(f"--peak-flops must be > 0, got {a.peak_flops}")
    g = gpu_search.cluster_gpu(
        g, memory=parse_bytes(a.device_memory, "--device-memory") if a.device_memory else None,
        peak=a.peak_flops, nvlink=intra.bytes_per_s if intra else None,
        nic=inter.bytes_per_s / a.devices_per_node if inter else None)
    if a.nodes < 1 or a.devices_per_node < 1:
        raise PlanError("--nodes and --devices-per-node must be >= 1")
    return gs.GpuCluster(g, nodes=a.nodes, per_node=a.devices_per_node)


def gpu_arch_from_args(a):
    from dtlab.costmodel import gpu_step as gs
    m, batch, _preset = model_from_args(a)
    kv = a.kv_heads
    if kv is not None and (kv < 1 or m.n_head % kv):
        raise PlanError(f"--kv-heads {kv} must divide --heads {m.n_head}")
    arch = gs.Arch(layers=m.n_layer, hidden=m.d_model, heads=m.n_head, ffn=m.d_ff,
                   vocab=m.vocab, seq=m.seq, kv_heads=kv, style=a.arch, tied=a.tied)
    return arch, batch


def gpu_search_from_args(a):
    from dtlab.plan import gpu_search
    sp = parse_words(a.sp, "--sp", ("off", "on"))
    return gpu_search.GpuSearch(
        dp=parse_ints(a.dp, "--dp"), tp=parse_ints(a.tp, "--tp"), pp=parse_ints(a.pp, "--pp"),
        mbs=parse_ints(a.mbs, "--mbs"), zero=parse_ints(a.zero, "--zero", 0, 3) or (0,),
        recompute=parse_words(a.recompute, "--recompute", ("none", "selective", "full")),
        sp=tuple(x == "on" for x in sp),
        interleave=parse_ints(a.interleave, "--interleave") or (1,))


def run_gpu(a) -> int:
    """``dtlab plan --gpu NAME``: the search on the GPU step model (dtlab/plan/gpu_search.py)."""
    from dtlab.plan import gpu_search
    c = gpu_cluster_from_args(a)          # an unknown GPU is refused before anything else
    if a.calibration:
        raise PlanError("--calibration times this machine's CPU for the CPU model; --gpu uses "
                        "the GPU model's fitted constants: give one or the other")
    arch, batch = gpu_arch_from_args(a)
    top = a.top or 5
    res = gpu_search.plan_gpu(arch, batch, c, gpu_search_from_args(a), keep=max(top, 1))
    if a.json:     # written in place of any old one at once, without torch's import
        import os
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        os.replace(tmp, out)
    gpu_search.print_plan(res, top)
    if a.json:
        print(f"record: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
