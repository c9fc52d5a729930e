"""``dtlab plan --gpu NAME``: the layout search on the GPU step model
(dtlab/costmodel/gpu_step.py) instead of the CPU toy's.

The search names every layout of the cluster's GPUs: dp x tp x pp dividing the world (tp
within a node and dividing the heads), every micro-batch size dividing a DP rank's share of the
global batch (the micro-batch count, gradient accumulation, follows), ZeRO 0-3 (2 and 3 only
without a pipeline, as gpu_step.invalid has it), recomputation none / selective / full, sequence
parallelism on and off (tp > 1), and interleaved 1F1B with v model chunks a pipeline rank (v in
1, 2, 4 dividing the blocks a stage, micro-batches a multiple of pp).

Pruning keeps it fast without changing the answer:

1. memory first: a (tp, pp, dp, micro-batch) group whose leanest variant (the highest ZeRO
   stage, full recomputation, SP, no interleaving) does not fit is dropped whole, and every
   variant's memory is checked before its time;
2. a bound on time: a group's step cannot be shorter than its micro-batch slots (m + (pp-1)/v
   for the largest v it allows) times the longer of its GPU path without recomputation (GEMMs,
   attention, element-wise bytes with SP, TP rings) and its host path, plus the optimizer's HBM
   time at the highest ZeRO stage. Groups are costed in order of that bound; once the bound
   reaches the slowest of the ``keep`` best layouts found, no later group can enter them, so
   the listed ranking is the one the exhaustive search gives (tests/test_plan_gpu.py checks it).

The constants are those fitted on every row of the Ultra-Scale Playbook's H100 sweep (the record
docs/reference/plan-measured-h100.json, "fit_all_rows"; :data:`FITTED` holds the same values
for when the record is absent). Selective recomputation saves no memory in this model (flash
attention keeps no scores to drop), so it costs time and never ranks above none.
"""
from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dtlab.costmodel import gpu_step as gs
from dtlab.costmodel.gpus import GB, Gpu
from dtlab.costmodel.step_time import PlanError

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "docs" / "reference" / "plan-measured-h100.json"
# the constants of RECORD's "fit_all_rows" (dtlab plan validate --measured-set playbook-h100)
FITTED = gs.Constants(compute=1.0535891612035344, memory_bound=3.8133655104897013,
                      per_layer=0.0036660623598143718, comm=2.2293604986419373,
                      cross_sync=0.002673645242148544, overhead=523078845.100169)
HEADER = ("GPU model (dtlab/costmodel/gpu_step.py), constants fitted on the Playbook's H100 "
          "sweep")
MFU_DEFINITION = ("MFU = (6 N + 12 L h s) FLOPs a token x tokens/s a GPU / the GPU's dense "
                  "bf16 peak; HFU adds the recomputed forward's FLOPs")
PARTS = ("compute", "dp", "tp", "pp", "bubble", "other")
PART_NAMES = {"compute": "compute", "dp": "exposed DP communication", "tp": "TP communication",
              "pp": "pipeline sends", "bubble": "pipeline bubble",
              "other": "other (HBM-bound work, host launches)"}
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "overhead")


def constants() -> tuple[gs.Constants, str]:
    """The fitted constants and where they came from."""
    try:
        rec = json.loads(RECORD.read_text())
        vals = {n: c["value"] for n, c in rec["fit_all_rows"]["constants"].items()}
        return gs.Constants(**vals), f"read from {RECORD.relative_to(ROOT)} (fit_all_rows)"
    except (OSError, KeyError, TypeError, ValueError):
        return FITTED, ("the defaults in dtlab/plan/gpu_search.py (FITTED, equal to "
                        "docs/reference/plan-measured-h100.json's fit_all_rows)")


@dataclass(frozen=True)
class GpuSearch:
    dp: tuple[int, ...] | None = None
    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    mbs: tuple[int, ...] | None = None          # None: every divisor of batch / dp
    zero: tuple[int, ...] = (0, 1, 2, 3)
    recompute: tuple[str, ...] = ("none", "selective", "full")
    sp: tuple[bool, ...] = (False, True)
    interleave: tuple[int, ...] = (1, 2, 4)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def cluster_gpu(g: Gpu, memory: float | None = None, peak: float | None = None,
                nvlink: float | None = None, nic: float | None = None) -> Gpu:
    """The GPU with the user's figures in place of the datasheet's; a new peak scales the
    achievable matmul rate with it."""
    out = g
    if memory is not None:
        out = replace(out, memory=memory)
    if peak is not None:
        out = replace(out, peak={**g.peak, "bf16": peak}, mamf=g.mamf * peak / g.peak["bf16"])
    if nvlink is not None:
        out = replace(out, nvlink=nvlink)
    if nic is not None:
        out = replace(out, nic=nic)
    return out


# ---------------------------------------------------------------------------- the parts
def breakdown(t: dict) -> dict:
    """gpu_step's step seconds as parts that sum to the total: the bubble (the idle slots'
    share of the stage's work) taken out of compute, TP and the rest of the stage."""
    b = t["bubble_share"]
    stage_mem = t["memory_bound"] - t["step_memory"]
    parts = {"compute": t["compute"] * (1 - b), "dp": t["dp"], "tp": t["tp"] * (1 - b),
             "pp": t["pp"], "bubble": t["bubble"],
             "other": (stage_mem + t["per_layer"] + t["cross_sync"]) * (1 - b)
             + t["step_memory"]}
    parts["total"] = t["total"]
    return parts


def _variants(a: gs.Arch, tp: int, pp: int, m: int, s: GpuSearch):
    per_stage = a.layers // pp if a.layers % pp == 0 else None
    for zero in s.zero:
        if zero >= 2 and pp > 1:
            continue
        for rc in s.recompute:
            for sp in s.sp:
                if sp and tp == 1:
                    continue
                for v in s.interleave:
                    if v > 1 and (pp == 1 or m % pp or per_stage is None or per_stage % v):
                        continue
                    yield zero, rc, sp, v


def lower_bound(a: gs.Arch, tp: int, pp: int, dp: int, mbs: int, m: int, vmax: int,
                zmax: int, c: gs.GpuCluster, k: gs.Constants) -> float:
    """No variant of the group (ZeRO, recomputation, SP, interleaving) steps faster than this
    (the module's doc, step 2; each term is the smallest its gpu_step.features counterpart
    can be)."""
    g = c.gpu
    li = gs.layer_ideal(a, tp, mbs, tp > 1, "none", g)
    hi = gs.head_ideal(a, tp, mbs, g)
    L = a.layers
    mb_compute = max((L * li["compute"] + hi["compute"]) / pp, hi["compute"], li["compute"])
    mb_mem = (L * li["hbm_bytes"] + hi["hbm_bytes"]) / pp / g.hbm_bytes_per_s
    layers = math.ceil(L / pp)
    tpg = gs.group(tp, 1, c)
    mb_tp = layers * gs.ring_seconds("all_gather", li["tp_bytes"] / 8, tpg, c) * 8
    alpha = (layers * 8 * (tp - 1) * (gs.ALPHA_NET if tpg.cross else gs.ALPHA_NVLINK)
             if tp > 1 else 0.0)
    cross = (layers * tp if pp > 1 and tp > 1 and gs.group(pp, tp * dp, c).cross else 0.0)
    gpu = k.compute * mb_compute + k.memory_bound * mb_mem + k.comm * mb_tp
    host = k.per_layer * max(L / pp, 1.0) + k.comm * alpha + k.cross_sync * cross
    lay = gs.GpuLayout(dp=dp, tp=tp, pp=pp, mbs=mbs, grad_acc=m)
    p = max(gs.stage_params(a, lay).values())
    p_opt = p / dp if zmax >= 1 else p
    step_mem = (m * p * (gs.BF16 + 2 * gs.FP32)
                + p_opt * (2 * gs.FP32 + 4 * gs.FP32 + gs.FP32 + gs.BF16)) / g.hbm_bytes_per_s
    return (m + (pp - 1) / vmax) * max(gpu, host) + k.memory_bound * step_mem


def _layout_arch(a: gs.Arch, pp: int) -> gs.Arch:
    return a.untied() if pp > 1 else a


def search(a: gs.Arch, batch: int, c: gs.GpuCluster, k: gs.Constants,
           s: GpuSearch = GpuSearch(), keep: int = 5, exhaustive: bool = False) -> dict:
    """The ``keep`` fastest layouts that fit, with counts of what was costed and pruned."""
    t0 = time.perf_counter()
    W, mem_cap = c.world, c.gpu.memory
    groups = []
    counts = {"layouts": 0, "groups": 0, "groups_memory_pruned": 0, "groups_bound_pruned": 0,
              "memory_checked": 0, "too_big": 0, "costed": 0}
    leanest = None                     # (bytes, label) of the leanest layout seen
    for tp in (s.tp or divisors(c.per_node)):
        if c.per_node % tp or a.heads % tp or a.kv % tp:
            continue
        for pp in (s.pp or divisors(W // tp if W % tp == 0 else 1)):
            if W % (tp * pp) or pp > a.layers:
                continue
            dp = W // (tp * pp)
            if (s.dp and dp not in s.dp) or batch % dp:
                continue
            for mbs in (s.mbs or divisors(batch // dp)):
                if (batch // dp) % mbs:
                    continue
                m = batch // (dp * mbs)
                vs = list(_variants(a, tp, pp, m, s))
                if not vs:
                    continue
                counts["groups"] += 1
                counts["layouts"] += len(vs)
                # memory first: the leanest variant of the group
                zl = max(z for z, *_ in vs)
                rcl = "full" if "full" in s.recompute else (
                    "selective" if "selective" in s.recompute else "none")
                lean = gs.GpuLayout(dp=dp, tp=tp, pp=pp, mbs=mbs, grad_acc=m, zero=zl,
                                    sp=tp > 1 and True in s.sp, recompute=rcl)
                counts["memory_checked"] += 1
                need = gs.memory_bytes(_layout_arch(a, pp), lean, c, k)["total"]
                if leanest is None or need < leanest[0]:
                    leanest = (need, lean.label())
                if need > mem_cap:
                    counts["groups_memory_pruned"] += 1
                    continue
                vmax = max(v for *_, v in vs)
                lb = lower_bound(a, tp, pp, dp, mbs, m, vmax, zl, c, k)
                groups.append((lb, tp, pp, dp, mbs, m, vs))
    groups.sort(key=lambda x: x[0])
    best: list = []                    # heap of (-time, -memory, n, entry): the keep fastest
    n = 0
    for gi, (lb, tp, pp, dp, mbs, m, vs) in enumerate(groups):
        if not exhaustive and len(best) >= keep and lb > -best[0][0] + 1e-9:
            counts["groups_bound_pruned"] = len(groups) - gi
            break
        arch = _layout_arch(a, pp)
        for zero, rc, sp, v in vs:
            lay = gs.GpuLayout(dp=dp, tp=tp, pp=pp, mbs=mbs, grad_acc=m, zero=zero, sp=sp,
                               recompute=rc, interleave=v)
            counts["memory_checked"] += 1
            mem = gs.memory_bytes(arch, lay, c, k)
            if mem["total"] > mem_cap:
                counts["too_big"] += 1
                if mem["total"] < leanest[0]:
                    leanest = (mem["total"], lay.label())
                continue
            t = gs.step_seconds(arch, lay, c, k)
            counts["costed"] += 1
            key = (-round(t["total"], 9), -mem["total"])
            n += 1
            item = (key[0], key[1], -n, (lay, t, mem))
            if len(best) < keep:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
    wall = time.perf_counter() - t0
    ranked = [x[3] for x in sorted(best, reverse=True)]
    if not ranked:
        need, label = leanest if leanest else (float("nan"), "none")
        raise PlanError(
            f"the model fits nowhere: the leanest layout ({label}) needs {need / GB:.1f} GB a "
            f"GPU, the {c.gpu.name} has {mem_cap / GB:.1f} GB; add GPUs or memory, or a "
            "smaller micro-batch")
    rows = [_row(a, batch, c, lay, t, mem) for lay, t, mem in ranked]
    for r in rows[1:]:
        r["why_not_best"] = why_slower(rows[0], r)
    return {"ranked": rows, "counts": counts, "wall_s": wall,
            "leanest": {"label": leanest[1], "bytes": leanest[0]}}


def _row(a: gs.Arch, batch: int, c: gs.GpuCluster, lay: gs.GpuLayout, t: dict,
         mem: dict) -> dict:
    arch = _layout_arch(a, lay.pp)
    tok = batch * a.seq / t["total"] / c.world
    peak = c.gpu.peak["bf16"]
    memory = {p: mem[p] for p in MEMORY_PARTS}
    memory["activations"] += mem["logits"]
    memory["total"] = mem["total"]
    return {"label": lay.label(), "layout": asdict(lay), "time": breakdown(t),
            "host_bound": t["host_bound"], "recompute_s": t["recompute"],
            "tokens_per_s_per_gpu": tok,
            "mfu": gs.mfu(a, tok, c.gpu, lay.pp),
            "hfu": gs.hardware_flops_per_token(arch, lay.recompute) * tok / peak,
            "memory": memory, "fits": True}


def why_slower(best: dict, other: dict) -> str:
    """The part of the step where ``other`` loses most time to ``best``."""
    d = {p: other["time"][p] - best["time"][p] for p in PARTS}
    worst = max(d, key=d.get)
    if d[worst] <= 1e-4 * best["time"]["total"]:
        return (f"same time, {(other['memory']['total'] - best['memory']['total']) / GB:+.1f} "
                "GB a GPU")
    return f"+{d[worst]:.3g} s {PART_NAMES[worst]}"


# ---------------------------------------------------------------------------- the command
def describe(a: gs.Arch) -> str:
    return (f"{a.style}-style, {a.layers} layers, d_model {a.hidden}, {a.heads} heads"
            + (f" ({a.kv} key/value)" if a.kv != a.heads else "")
            + f", ffn {a.ffn}, vocab {a.vocab}, seq {a.seq}"
            + (", tied embeddings" if a.tied else "") + f"; {a.params() / 1e9:.1f}B parameters")


def plan_gpu(a: gs.Arch, batch: int, c: gs.GpuCluster, s: GpuSearch = GpuSearch(),
             keep: int = 5) -> dict:
    k, source = constants()
    for name, v in (("--nodes", c.nodes), ("--devices-per-node", c.per_node),
                    ("--batch", batch)):
        if v < 1:
            raise PlanError(f"{name} must be >= 1, got {v}")
    if a.hidden % a.heads or a.heads % a.kv:
        raise PlanError(f"--d-model {a.hidden} must be a multiple of --heads {a.heads}, and "
                        f"--heads of --kv-heads {a.kv}")
    res = search(a, batch, c, k, s, keep)
    g = c.gpu
    res.update({
        "model_used": HEADER, "constants": k.as_dict(), "constants_source": source,
        "mfu_definition": MFU_DEFINITION,
        "model": {**asdict(a), "params": a.params()}, "batch": batch,
        "cluster": {"gpu": g.name, "nodes": c.nodes, "per_node": c.per_node,
                    "memory_bytes": g.memory, "bf16_peak": g.peak["bf16"], "mamf": g.mamf,
                    "nvlink_bytes_per_s": c.intra_bw, "nic_bytes_per_s": c.inter_bw,
                    "source": g.source},
    })
    return res


def print_plan(res: dict, top: int) -> None:
    from rich.table import Table  # rich: start-up (the CLI parser imports this)

    from dtlab.report.tables import console
    c, cnt = res["cluster"], res["counts"]
    print(f"{res['model_used']}; constants {res['constants_source']}")
    m = res["model"]
    print(f"model: {describe(gs.Arch(**{k: v for k, v in m.items() if k != 'params'}))}; "
          f"global batch {res['batch']} sequences")
    print(f"cluster: {c['nodes']} node(s) x {c['per_node']} {c['gpu']}, "
          f"{c['memory_bytes'] / GB:.0f} GB, {c['bf16_peak'] / 1e12:.1f} TFLOP/s bf16 peak, "
          f"NVLink {c['nvlink_bytes_per_s'] / GB:.0f} GB/s, NIC {c['nic_bytes_per_s'] / GB:.0f} "
          "GB/s a GPU (one direction)")
    print(f"searched: {cnt['layouts']} layouts in {cnt['groups']} dp x tp x pp x micro-batch "
          f"groups, "
          f"{cnt['groups_memory_pruned']} too big even at their leanest, "
          f"{cnt['groups_bound_pruned']} pruned by the time bound; {cnt['costed']} layouts "
          f"costed, {cnt['too_big']} more too big; {res['wall_s']:.2f} s")
    t = Table(title=f"predicted step, fastest first (top {min(top, len(res['ranked']))})")
    for col in ("#", "layout", "step s", "compute/dp/tp/pp/bubble/other s", "MFU", "HFU",
                "GB a GPU", "weights/grads/optim/act/overhead GB", "why slower than #1"):
        t.add_column(col)
    for i, r in enumerate(res["ranked"][:top], 1):
        tm, mem = r["time"], r["memory"]
        t.add_row(str(i), r["label"], f"{tm['total']:.2f}",
                  "/".join(f"{tm[p]:.2f}" for p in PARTS), f"{r['mfu']:.1%}",
                  f"{r['hfu']:.1%}", f"{mem['total'] / GB:.1f}",
                  "/".join(f"{mem[p] / GB:.1f}" for p in MEMORY_PARTS),
                  r.get("why_not_best", "best"))
    console(220).print(t)
    print("parts: compute the GEMMs and attention of the busy slots; dp the exposed gradient "
          "reduce and ZeRO gathers; tp the TP rings; pp the pipeline sends; bubble the idle "
          "slots; other the HBM-bound work (norms, accumulation, optimizer) and host launches")
    print(res["mfu_definition"])
    print("figures are predictions of the GPU model, not measurements")
