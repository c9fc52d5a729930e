"""``dtlab plan validate --measured-set NAME``: the GPU step model (dtlab/costmodel/gpu_step.py)
against training runs measured by others, with no cluster and no root.

The one set today, ``playbook-h100``, is the H100 sweep of Hugging Face's *The Ultra-Scale
Playbook: Training LLMs on GPU Clusters* (2025; nanotron, 1B, 3B and 8B Llama-style models on 1,
2, 4 and 8 nodes of 8 H100 80GB; docs/reference/measured/playbook-h100-sweep-subset.csv, whose
README in the planner data tells what is known about the runs).

The check is leave-one-model-out: the constants are fitted on two models' rows and predict the
third model's (three folds), then fitted once on every row. A fold reports the step time's mean
absolute percentage error (MAPE), its largest error and Spearman's rank correlation, the peak
memory's share of rows within 15%, and for every (model, nodes) cell whether the layout the
model predicts fastest is within 5% of the cell's measured fastest.

Stalls. About one row in eight runs several times slower than any cost of its layout: ~0.5 to
1.3 s a micro-batch whatever the model's size, and the same layout one ZeRO stage apart
often runs at the expected speed (3B, 4 nodes, dp2 tp8 pp2 mbs1: 0.86 s a micro-batch with
ZeRO-0, 0.34 s with ZeRO-1). No layout-level cost explains that, so a row measured more than
``STALL`` times the prediction is a *stall*: the fit leaves it out (found again after every
refit), the MAPE is given without the stalls and over every row, and the record lists each
stall. Memory has no stalls: every row counts.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from dtlab.costmodel import gpu_step as gs
from dtlab.costmodel.fitting import spearman
from dtlab.costmodel.gpus import gpu as gpu_named
from dtlab.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
STALL = 2.0          # measured / predicted above this: a stall (see the module's doc)
TIME_BAND = 0.15     # the plot's band around predicted = measured
MEM_BAND = 0.15      # the memory target's band
CELL_BAND = 0.05     # the best layout's band
START = gs.Constants(per_layer=4e-3, cross_sync=3e-3)    # where the alternating fit starts

SETS = {
    "playbook-h100": {
        "csv": "docs/reference/measured/playbook-h100-sweep-subset.csv",
        "image": "plan-measured-h100.png",
        "gpu": "H100", "per_node": 8, "seq": 4096,
        # shapes from nanotron's scripts/scaling_benchmarks.py (layers, hidden, heads, MLP
        # width); embeddings tied under an MLP width of 10,000; vocabulary 131,072
        "arch": {"1B": gs.Arch(16, 2048, 32, 8192, 131072, 4096, tied=True),
                 "3B": gs.Arch(28, 3072, 32, 8192, 131072, 4096, tied=True),
                 "8B": gs.Arch(32, 4096, 32, 14336, 131072, 4096)},
        "source": "Hugging Face, The Ultra-Scale Playbook: Training LLMs on GPU Clusters "
                  "(2025), the interactive benchmark chart's runs (nanotron; bf16 with fp32 "
                  "gradient accumulation, TP with sequence parallelism, 1F1B, flash attention, "
                  "no recomputation, ZeRO 0 or 1); the 1B, 3B and 8B models on 1-8 nodes of 8 "
                  "H100 80GB (NVLink/NVSwitch inside a node, AWS p5 EFA 3200 Gb/s a node "
                  "between nodes: dtlab/costmodel/gpus.py)",
        "memory_unit": 1e9,      # gpu_mem_gb is in GB: 1e9 fits better than GiB (see the record)
    },
}

CONSTANT_MEANING = {
    "compute": "x the ideal time of the GEMMs (128x128 tile waves at the MAMF rate) and flash "
               "attention (at FLASH_SHARE of the BF16 peak)",
    "memory_bound": "x the HBM time (datasheet bandwidth) of the element-wise work, gradient "
                    "accumulation and the optimizer",
    "per_layer": "seconds the host takes to launch one block's forward and backward for one "
                 "micro-batch; a micro-batch lasts at least its launches (and its TP rings' "
                 "latency)",
    "comm": "x the alpha-beta time of every collective and pipeline send (TP on NVLink or the "
            "NICs, DP rings, PP sends)",
    "cross_sync": "seconds a block a micro-batch a TP rank that a pipeline whose stages sit on "
                  "different nodes adds to the host's path (a measured effect, not derived)",
    "overhead": "bytes a GPU holds beyond the model's states, activations and logits: CUDA "
                "context, NCCL and allocator buffers",
}


def known_sets() -> str:
    return ", ".join(SETS)


def load(name: str) -> tuple[dict, list[dict]]:
    """The set's description and its rows, each with the model's arch, the layout, the
    cluster, the measured step seconds (dp x mbs x grad_acc x seq / tok_s: the row's own batch,
    which three rows hold differently from gbs), peak bytes and MFU."""
    if name not in SETS:
        raise UsageError(f"--measured-set {name!r}: unknown measured set; known: {known_sets()}")
    spec = SETS[name]
    g = gpu_named(spec["gpu"])
    rows = []
    with open(ROOT / spec["csv"], newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            n = {k: int(r[k]) for k in ("nodes", "mbs", "grad_acc", "gbs", "dp", "pp", "tp",
                                        "zero")}
            lay = gs.GpuLayout(dp=n["dp"], tp=n["tp"], pp=n["pp"], mbs=n["mbs"],
                               grad_acc=n["grad_acc"], zero=n["zero"], sp=n["tp"] > 1)
            arch = spec["arch"][r["model"]]
            rows.append({
                "row": i, "model": r["model"], "nodes": n["nodes"], "layout": lay.label(),
                "arch": arch.untied() if lay.pp > 1 else arch, "lay": lay,
                "cluster": gs.GpuCluster(g, nodes=n["nodes"], per_node=spec["per_node"]),
                "step_s": n["dp"] * n["mbs"] * n["grad_acc"] * spec["seq"] / float(r["tok_s"]),
                "memory": float(r["gpu_mem_gb"]) * spec["memory_unit"],
                "mfu": float(r["mfu_pct"]) / 100, "tok_s_gpu": float(r["tok_s_gpu"]),
            })
    return spec, rows


def _run(r: dict) -> tuple:
    return r["arch"], r["lay"], r["cluster"]


def predict(r: dict, k: gs.Constants) -> dict:
    """One row's predicted step seconds, bytes and MFU under constants ``k``."""
    t = gs.step_seconds(*_run(r), k)
    m = gs.memory_bytes(*_run(r), k)
    tok_s_gpu = r["lay"].dp * r["lay"].mbs * r["lay"].grad_acc * r["arch"].seq / t["total"] / (
        r["lay"].world)
    return {"step_s": t["total"], "memory": m["total"], "host_bound": t["host_bound"],
            "mfu": gs.mfu(r["arch"], tok_s_gpu, r["cluster"].gpu)}


def fit(rows: list[dict], rounds: int = 8) -> tuple[gs.Constants, set[int]]:
    """The five time constants on ``rows`` without their stalls (found again after each fit,
    until the set stops changing), then memory's overhead on every row."""
    stalls: set[int] = set()
    k = START
    for _ in range(rounds):
        keep = [r for r in rows if r["row"] not in stalls]
        k = gs.fit_time([(*_run(r), r["step_s"]) for r in keep], start=k)
        new = {r["row"] for r in rows
               if r["step_s"] > STALL * gs.step_seconds(*_run(r), k)["total"]}
        if new == stalls:
            break
        stalls = new
    k = gs.fit_overhead([(*_run(r), r["memory"]) for r in rows], k)
    return k, stalls


def _errors(rows: list[dict], pred: dict) -> dict:
    """MAPE, largest error and Spearman over ``rows`` (their predictions in ``pred``)."""
    if not rows:
        return {"rows": 0, "mape": None, "max_error": None, "spearman": None}
    e = [pred[r["row"]]["step_s"] / r["step_s"] - 1 for r in rows]
    return {"rows": len(rows), "mape": statistics.fmean(abs(x) for x in e),
            "max_error": max(e, key=abs),
            "spearman": spearman([pred[r["row"]]["step_s"] for r in rows],
                                 [r["step_s"] for r in rows])}


def _summary(rows: list[dict], pred: dict, stalls: set[int]) -> dict:
    clean = [r for r in rows if r["row"] not in stalls]
    mem = [abs(pred[r["row"]]["memory"] / r["memory"] - 1) for r in rows]
    return {"time": _errors(clean, pred), "time_all_rows": _errors(rows, pred),
            "stalls": len(rows) - len(clean),
            "memory_within_15pct": sum(x <= MEM_BAND for x in mem) / len(mem),
            "memory_mape": statistics.fmean(mem)}


def cells(rows: list[dict], pred: dict) -> list[dict]:
    """For each (model, nodes): the layout predicted fastest against the measured fastest."""
    out = []
    for key in sorted({(r["model"], r["nodes"]) for r in rows}):
        cell = [r for r in rows if (r["model"], r["nodes"]) == key]
        best = min(cell, key=lambda r: r["step_s"])
        pick = min(cell, key=lambda r: pred[r["row"]]["step_s"])
        gap = pick["step_s"] / best["step_s"] - 1
        out.append({"model": key[0], "nodes": key[1], "layouts": len(cell),
                    "measured_best": best["layout"], "measured_best_s": best["step_s"],
                    "predicted_best": pick["layout"], "predicted_best_measured_s":
                    pick["step_s"], "predicted_best_predicted_s": pred[pick["row"]]["step_s"],
                    "gap": gap, "within_5pct": gap <= CELL_BAND})
    return out


def _constants(k: gs.Constants) -> dict:
    return {n: {"value": v, "meaning": CONSTANT_MEANING[n]} for n, v in k.as_dict().items()}


def validate_measured(name: str = "playbook-h100") -> dict:
    """The record: three leave-one-model-out folds and a fit on every row (see the doc)."""
    spec, rows = load(name)
    models = sorted({r["model"] for r in rows})
    held: dict[int, dict] = {}
    stall_in: dict[int, str] = {}
    folds = []
    for m in models:
        train = [r for r in rows if r["model"] != m]
        test = [r for r in rows if r["model"] == m]
        k, train_stalls = fit(train)
        pred = {r["row"]: predict(r, k) for r in test}
        stalls = {r["row"] for r in test if r["step_s"] > STALL * pred[r["row"]]["step_s"]}
        held.update(pred)
        stall_in.update({i: f"held out ({m})" for i in stalls})
        fc = cells(test, pred)
        folds.append({"held_out": m, "train_rows": len(train),
                      "train_stalls": len(train_stalls), "test_rows": len(test),
                      **_summary(test, pred, stalls),
                      "cells_within_5pct": sum(c["within_5pct"] for c in fc),
                      "cells": len(fc), "constants": _constants(k)})
    k_all, stalls_all = fit(rows)
    pred_all = {r["row"]: predict(r, k_all) for r in rows}
    lomo_stalls = set(stall_in)
    cell_rows = cells(rows, held)
    record = {
        "name": name, "source": spec["source"], "data": spec["csv"],
        "model": "dtlab/costmodel/gpu_step.py",
        "method": "leave-one-model-out: constants fitted on two models' rows predict the third "
                  "model's; then one fit on every row",
        "rules": {
            "step_s": "dp x mbs x grad_acc x seq / tok_s (the row's own batch)",
            "memory": f"gpu_mem_gb x {spec['memory_unit']:g} bytes (GB; GiB fits worse)",
            "stall": f"measured step time > {STALL:g} x predicted: left out of the fit and of "
                     "'time'; 'time_all_rows' keeps them",
            "cell": f"the predicted-fastest layout's measured time within {CELL_BAND:.0%} of the "
                    "cell's measured fastest (every row of the cell, stalls included, predicted "
                    "by the fold that held its model out)",
        },
        "folds": folds,
        "leave_one_model_out": {**_summary(rows, held, lomo_stalls),
                                "cells_within_5pct": sum(c["within_5pct"] for c in cell_rows),
                                "cells": len(cell_rows)},
        "cells": cell_rows,
        "fit_all_rows": {**_summary(rows, pred_all, stalls_all), "constants": _constants(k_all)},
        "stall_rows": [{"row": r["row"], "model": r["model"], "nodes": r["nodes"],
                        "layout": r["layout"], "measured_s": r["step_s"],
                        "predicted_s": held[r["row"]]["step_s"],
                        "mfu": r["mfu"], "memory_gb": r["memory"] / 1e9}
                       for r in rows if r["row"] in lomo_stalls],
        "rows": [{"row": r["row"], "model": r["model"], "nodes": r["nodes"],
                  "layout": r["layout"],
                  "measured": {"step_s": r["step_s"], "memory": r["memory"], "mfu": r["mfu"]},
                  "predicted": {"step_s": held[r["row"]]["step_s"],
                                "memory": held[r["row"]]["memory"],
                                "mfu": held[r["row"]]["mfu"],
                                "host_bound": held[r["row"]]["host_bound"]},
                  "predicted_fit_all": {"step_s": pred_all[r["row"]]["step_s"],
                                        "memory": pred_all[r["row"]]["memory"]},
                  "stall": r["row"] in lomo_stalls}
                 for r in rows],
    }
    return record


# ---------------------------------------------------------------------------- the command
def plot(record: dict, path: Path) -> Path:
    """Predicted (leave-one-model-out) against measured step time, one colour a model."""
    from dtlab.plotting import plt_agg
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    vals = [r[s]["step_s"] for r in record["rows"] for s in ("measured", "predicted")]
    lo, hi = min(vals) / 1.3, max(vals) * 1.3
    xs = [lo, hi]
    ax.fill_between(xs, [lo * (1 - TIME_BAND), hi * (1 - TIME_BAND)],
                    [lo * (1 + TIME_BAND), hi * (1 + TIME_BAND)], color="0.85", label="±15%")
    ax.plot(xs, xs, "k-", lw=0.8, label="predicted = measured")
    for i, m in enumerate(sorted({r["model"] for r in record["rows"]})):
        for stall in (False, True):
            pts = [r for r in record["rows"] if r["model"] == m and r["stall"] == stall]
            if not pts:
                continue
            ax.scatter([r["measured"]["step_s"] for r in pts],
                       [r["predicted"]["step_s"] for r in pts], s=14, alpha=0.8,
                       color=f"C{i}", facecolors="none" if stall else f"C{i}",
                       label=f"{m}" + (" (stall)" if stall else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s), the model held out of the fit")
    f = record["folds"]
    ax.set_title(f"{record['name']}: {len(record['rows'])} runs, each predicted with its model "
                 "held out\nMAPE without stalls " + " / ".join(
                     f"{x['held_out']} {x['time']['mape']:.1%}" for x in f)
                 + "; over every run " + " / ".join(
                     f"{x['time_all_rows']['mape']:.1%}" for x in f), fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(record: dict) -> None:
    print(f"{record['name']}: {len(record['rows'])} runs ({record['source'][:60]}...)")
    print(f"{'held out':>8} {'MAPE':>6} {'max err':>8} {'Spearman':>8} {'stalls':>6} "
          f"{'MAPE all':>8} {'mem ±15%':>8} {'cells':>5}")
    for f in record["folds"]:
        t, a = f["time"], f["time_all_rows"]
        print(f"{f['held_out']:>8} {t['mape']:>6.1%} {t['max_error']:>+8.1%} "
              f"{t['spearman']:>8.3f} {f['stalls']:>6} {a['mape']:>8.1%} "
              f"{f['memory_within_15pct']:>8.1%} {f['cells_within_5pct']:>2}/{f['cells']}")
    lo = record["leave_one_model_out"]
    print(f"best layout within 5% of the measured best: {lo['cells_within_5pct']}/{lo['cells']}"
          f" cells; memory within 15%: {lo['memory_within_15pct']:.1%} of the rows")
    print("constants (fit on every row): " + ", ".join(
        f"{n}={c['value']:.4g}" for n, c in record["fit_all_rows"]["constants"].items()))


def run(args) -> int:
    """``dtlab plan validate --measured-set NAME [--json PATH] [--img DIR]``."""
    name = args.measured_set
    if name not in SETS:
        raise UsageError(f"--measured-set {name!r}: unknown measured set; known: {known_sets()}")
    record = validate_measured(name)
    out = Path(args.json or f"runs/plan/measured-{name}.json")
    img = Path(args.img) if args.img else out.parent
    img = img if img.suffix == ".png" else img / SETS[name]["image"]
    record["image"] = str(img)
    record["what"] = (f"the GPU step model against {name}'s measured runs, leave one model out "
                      f"(`dtlab plan validate --measured-set {name}`)")
    record["command"] = " ".join(["dtlab plan validate --measured-set", name, "--json",
                                  str(out)] + (["--img", str(args.img)] if args.img else []))
    from dtlab.measure.run_record import atomic_write_text   # torch: only when writing
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    plot(record, img)
    print_table(record)
    print(f"record: {out}\nplot: {img}")
    return 0

