"""``dtlab plan validate``: run layouts for real and hold the planner's predictions against them.

Each layout of the set runs once under ``dtlab run`` (no baseline, 16 steps); its median
step time and its busiest rank's counted memory (weights + gradients + optimizer state + the
activations autograd saved: what the planner predicts; the process's resident memory also holds
torch itself and is not predicted) are set beside the prediction made from the calibration. The
record gives every layout's error, the mean and max absolute percentage error, the Spearman rank
correlation of predicted and measured step time (over all layouts, and within each group that
competes for the same devices), and whether the layout predicted fastest in a group is within
5% of the measured fastest. Sets:

- ``full``: presets tiny, small and long on this machine (1-4 ranks: DDP, ZeRO 1-3 and offload,
  TP, PP with GPipe and 1F1B and 2-4 micro-batches, 3D and CP cuts, recomputation), and with
  ``--cluster-rates`` the small preset across two nodes of the namespace cluster (1 rank a node
  at each rate, 2 ranks a node at the first);
- ``ci``: three tiny layouts on this machine (a smoke test of the whole path).
"""
from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dtlab.cluster.netns import Cluster
from dtlab.costmodel.step_time import (ClusterSpec, Compute, Layout, Links, load_calibration,
                                       predict)
from dtlab.costmodel.fitting import spearman
from dtlab.errors import UsageError
from dtlab.plan.calibrate import calibrate
from dtlab.plotting import plt_agg
from dtlab.launch import sessions

# (preset, nproc per node, layout fields) on this machine
HOST_SET = [
    ("tiny", 1, {}), ("tiny", 2, {"dp": 2}), ("tiny", 4, {"dp": 4}), ("tiny", 2, {"tp": 2}),
    ("tiny", 2, {"pp": 2, "microbatches": 2}), ("tiny", 2, {"dp": 2, "zero": 3}),
    ("small", 1, {}), ("small", 1, {"recompute": "full"}), ("small", 2, {"dp": 2}),
    ("small", 2, {"dp": 2, "recompute": "full"}), ("small", 2, {"dp": 2, "recompute": "selective"}),
    ("small", 2, {"dp": 2, "zero": 1}), ("small", 2, {"dp": 2, "zero": 2}),
    ("small", 2, {"dp": 2, "zero": 3}), ("small", 2, {"dp": 2, "zero": 2, "offload": "optimizer"}),
    ("small", 2, {"tp": 2}), ("small", 2, {"pp": 2, "microbatches": 2}),
    ("small", 2, {"pp": 2, "microbatches": 4, "schedule": "gpipe"}),
    ("small", 2, {"pp": 2, "microbatches": 4, "recompute": "full"}),
    ("small", 4, {"dp": 4}), ("small", 4, {"tp": 4}), ("small", 4, {"pp": 4, "microbatches": 4}),
    ("small", 4, {"dp": 2, "tp": 2}), ("small", 4, {"dp": 2, "pp": 2, "microbatches": 2}),
    ("small", 4, {"tp": 2, "pp": 2, "microbatches": 2}),
    ("long", 1, {}), ("long", 2, {"dp": 2}), ("long", 2, {"tp": 2}),
    ("long", 2, {"pp": 2, "microbatches": 2}), ("long", 2, {"dp": 2, "recompute": "full"}),
    ("long", 2, {"cp": 2}), ("long", 4, {"dp": 2, "cp": 2}),
]
CLUSTER_ONE = [("small", 1, {"dp": 2}), ("small", 1, {"tp": 2}),
               ("small", 1, {"pp": 2, "microbatches": 2})]
CLUSTER_TWO = [("small", 2, {"dp": 4}), ("small", 2, {"dp": 2, "tp": 2})]
CI_SET = [("tiny", 1, {}), ("tiny", 2, {"dp": 2}), ("tiny", 2, {"pp": 2, "microbatches": 2})]


def _run_layout(preset: str, nproc: int, nnodes: int, lay, steps: int, out: Path,
                log: Path) -> dict:
    lab, flags = lay.lab_args()
    cmd = [sys.executable, "-m", "dtlab", "run", lab, "--nproc", str(nproc),
           *(["--nnodes", str(nnodes)] if nnodes > 1 else []), "--preset", preset,
           "--steps", str(steps), "--no-baseline", "--out", str(out), *flags]
    with open(log, "w") as f:
        rc = sessions.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    summary = out / "summary.json"
    if rc != 0 or not summary.is_file():
        raise UsageError(f"validation run failed (exit {rc}): {' '.join(cmd[2:])}; see {log}")
    d = json.loads(summary.read_text())
    per_rank = [r["params"] + r["grads"] + r["optimizer"] + r["activations_peak"]
                for r in d["memory"]["per_rank"]]
    return {"step_s": d["time"]["step_s_median"], "memory": max(per_rank),
            "command": "dtlab " + " ".join(cmd[3:])}


def _entries(args) -> list[tuple]:
    """(preset, nproc, nnodes, rate, layout fields) to run."""
    if args.set == "ci":
        return [(p, n, 1, "host", f) for p, n, f in CI_SET]
    out = [(p, n, 1, "host", f) for p, n, f in HOST_SET]
    rates = [r.strip() for r in (args.cluster_rates or "").split(",") if r.strip()]
    for i, rate in enumerate(rates):
        out += [(p, n, 2, rate, f) for p, n, f in CLUSTER_ONE]
        if i == 0:
            out += [(p, n, 2, rate, f) for p, n, f in CLUSTER_TWO]
    return out


def _key(e) -> tuple:
    """A layout of the set, from an entry or a record's row."""
    if isinstance(e, dict):
        return (e["preset"], e["per_node"], e["nodes"], e["rate"],
                json.dumps(e["layout"], sort_keys=True))
    return (*e[:4], json.dumps(e[4], sort_keys=True))


def validate(args) -> int:
    from dtlab.train.model import preset_shape  # torch: only for a preset
    if args.set not in ("full", "ci"):
        raise UsageError(f"--set {args.set!r}: choose full or ci")
    record = Path(args.json or "runs/plan/validate.json")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.calibration:
        calib = load_calibration(args.calibration)
    else:
        if args.set == "ci":
            args.presets, args.max_ranks, args.reps = "tiny", 2, 3
        calibrate(args)
        calib = load_calibration(args.out)
    entries = _entries(args)
    missing = {r for *_, r, _ in entries if r != "host" and f"inter@{r}" not in calib["links"]}
    if missing:
        raise UsageError(f"calibration {calib['name']!r} has no inter-node fits at "
                         f"{', '.join(sorted(missing))}: calibrate with --cluster-rates")
    earlier = None
    if args.measured:   # predictions again from this calibration, on the runs of a record
        earlier = {_key(r): r for r in json.loads(Path(args.measured).read_text())["layouts"]}
        lost = [e for e in entries if _key(e) not in earlier]
        if lost:
            raise UsageError(f"--measured {args.measured}: no run of {len(lost)} layout(s) of "
                             f"the set, e.g. {lost[0][:4]}; run them (drop --measured)")
    rows, t0 = [], time.perf_counter()
    current_rate = None
    if earlier is None and any(e[2] > 1 for e in entries):
        before = Cluster.load(args.cluster).rate or "unshaped"  # says how to start one if none
    try:
        for i, (preset, nproc, nnodes, rate, fields) in enumerate(entries, 1):
            lay = Layout(**fields)
            m, batch = preset_shape(preset)
            spec = ClusterSpec(nodes=nnodes, per_node=nproc, memory=float("inf"),
                               cores=calib["cores"], shared_cores=nnodes > 1,
                               rate=rate if nnodes > 1 else "unshaped")
            pred = predict(m, batch, lay, spec, Compute(m, spec, calib), Links(spec, calib))
            if earlier is not None:
                old = earlier[_key((preset, nproc, nnodes, rate, fields))]
                meas = {**old["measured"], "command": old["command"]}
            else:
                if nnodes > 1 and rate != current_rate:
                    from dtlab.bench.cluster import set_rate  # torch: the CLI parser imports this
                    set_rate(args.cluster, rate, work / "cluster.log")
                    current_rate = rate
                name = f"{i:02d}-{preset}-{nnodes}x{nproc}-{rate}-{lay.label().replace(' ', '_')}"
                meas = _run_layout(preset, nproc, nnodes, lay, args.steps, work / name,
                                   work / f"{name}.log")
            p_t, p_m = pred["time"]["total"], pred["memory"]["total"]
            row = {"preset": preset, "nodes": nnodes, "per_node": nproc, "rate": rate,
                   "layout": fields, "label": lay.label(), "command": meas["command"],
                   "measured": {"step_s": meas["step_s"], "memory": meas["memory"]},
                   "predicted": {"step_s": p_t, "memory": p_m, "time": pred["time"],
                                 "memory_by_category": pred["memory"]},
                   "ape_time": abs(p_t - meas["step_s"]) / meas["step_s"],
                   "ape_memory": abs(p_m - meas["memory"]) / meas["memory"]}
            rows.append(row)
            print(f"[{i}/{len(entries)}] {preset} {nnodes}x{nproc} {rate:>9} {lay.label():34s} "
                  f"measured {meas['step_s'] * 1e3:8.2f} ms  predicted {p_t * 1e3:8.2f} ms "
                  f"({row['ape_time'] * 100:5.1f}%)  memory {row['ape_memory'] * 100:5.2f}% off "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        if current_rate is not None:
            from dtlab.bench.cluster import set_rate  # torch: the CLI parser imports this
            set_rate(args.cluster, before, work / "cluster.log")
    rec = {"date": datetime.date.today().isoformat(), "set": args.set,
           "calibration": calib["name"], "machine": {k: calib.get(k) for k in
                                                     ("host", "cpu", "cores", "torch")},
           "steps": args.steps, "compute_resource": CPU_HONESTY, "layouts": rows,
           "measured_in": args.measured or "this run",
           "summary": summarise(rows)}
    from dtlab.measure.run_record import atomic_write_text  # torch: the CLI parser imports this
    atomic_write_text(record, json.dumps(rec, indent=1) + "\n")
    png = plot(rows, Path(args.img) if args.img else record.with_suffix(".png"))
    print_summary(rec["summary"])
    print(f"record: {record}   picture: {png}")
    return 0


CPU_HONESTY = ("cores are the compute resource: a rank gets cores // ranks-per-node threads, and "
               "ranks that together ask for more threads than the machine's cores are slowed by "
               "that ratio (4 ranks on 2 cores: x2); the namespace cluster's nodes share the "
               "same cores")


def summarise(rows: list[dict]) -> dict:
    ape = [r["ape_time"] for r in rows]
    mem = [r["ape_memory"] for r in rows]
    groups: dict = {}
    for r in rows:
        groups.setdefault(f"{r['preset']} {r['nodes']}x{r['per_node']} {r['rate']}",
                          []).append(r)
    best = {}
    within = []
    for g, rs in groups.items():
        if len(rs) < 2:
            continue
        pick = min(rs, key=lambda r: r["predicted"]["step_s"])
        fastest = min(rs, key=lambda r: r["measured"]["step_s"])
        gap = pick["measured"]["step_s"] / fastest["measured"]["step_s"] - 1
        best[g] = {"layouts": len(rs), "predicted_best": pick["label"],
                   "measured_best": fastest["label"], "gap": gap, "within_5pct": gap <= 0.05}
        rho = spearman([r["predicted"]["step_s"] for r in rs],
                       [r["measured"]["step_s"] for r in rs])
        if rho is not None:
            best[g]["spearman"] = rho
            within.append(rho)
    return {"layouts": len(rows), "mape_time": statistics.fmean(ape), "max_ape_time": max(ape),
            "worst_time": max(rows, key=lambda r: r["ape_time"])["label"],
            "mape_memory": statistics.fmean(mem), "max_ape_memory": max(mem),
            "spearman": spearman([r["predicted"]["step_s"] for r in rows],
                                 [r["measured"]["step_s"] for r in rows]),
            "spearman_within_groups_mean": statistics.fmean(within) if within else None,
            "best_within_5pct": f"{sum(b['within_5pct'] for b in best.values())}/{len(best)}",
            "groups": best}


def print_summary(s: dict) -> None:
    print(f"{s['layouts']} layouts: step time mean abs error {s['mape_time'] * 100:.1f}%, max "
          f"{s['max_ape_time'] * 100:.1f}% ({s['worst_time']}); memory mean "
          f"{s['mape_memory'] * 100:.2f}%, max {s['max_ape_memory'] * 100:.2f}%")
    rho = s["spearman"]
    print(f"Spearman (all layouts) {rho:.3f}" if rho is not None else "Spearman: too few layouts",
          end="")
    if s["spearman_within_groups_mean"] is not None:
        print(f", mean within groups {s['spearman_within_groups_mean']:.3f}", end="")
    print(f"; predicted best within 5% of measured best in {s['best_within_5pct']} groups")
    for g, b in s["groups"].items():
        print(f"  {g}: predicted best {b['predicted_best']!r}, measured best "
              f"{b['measured_best']!r}, {b['gap'] * 100:+.1f}%")


def plot(rows: list[dict], path: Path) -> Path:
    """Predicted against measured, step time and memory, one marker a group of layouts."""
    plt = plt_agg()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    styles: dict = {}
    markers = "osD^v<>Px*"
    for r in rows:
        key = f"{r['preset']}, {r['nodes']} x {r['per_node']}" + (
            f" @ {r['rate']}" if r["nodes"] > 1 else " on this machine")
        first = key not in styles
        if first:
            i = len(styles)   # colour and marker cycles shifted: no pair repeats
            styles[key] = (f"C{i % 10}", markers[(i + i // 10) % len(markers)])
        c, mk = styles[key]
        for ax, k, scale in ((axes[0], "step_s", 1e3), (axes[1], "memory", 2**-20)):
            ax.scatter(r["measured"][k] * scale, r["predicted"][k] * scale, color=c, marker=mk,
                       s=40, alpha=0.85, label=key if first and ax is axes[0] else None)
    for ax, k, scale, unit, what in ((axes[0], "step_s", 1e3, "ms", "step time"),
                                     (axes[1], "memory", 2**-20, "MiB",
                                      "memory of the busiest rank")):
        vals = [r[s][k] * scale for r in rows for s in ("measured", "predicted")]
        lo, hi = min(vals) / 1.3, max(vals) * 1.3
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured"
                if ax is axes[0] else None)
        if ax is axes[0]:
            for f in (1.1, 1 / 1.1):
                ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.8,
                        label="±10%" if f > 1 else None)
        ax.set_xlabel(f"measured {what} ({unit})")
        ax.set_ylabel(f"predicted {what} ({unit})")
        ax.set_title(f"{what}: predicted vs measured ({len(rows)} layouts)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p) -> None:
    p.add_argument("--set", default="full", help="validate: full (32 layouts here, more with "
                   "--cluster-rates) or ci (3 tiny layouts)")
    p.add_argument("--steps", type=int, default=16, help="validate: steps a run (default 16)")
    p.add_argument("--work", default="runs/plan/validate",
                   help="validate: where the runs write (default runs/plan/validate)")
    p.add_argument("--img", default=None, help="validate: the scatter plot (default: next to "
                   "the record)")
    p.add_argument("--measured", default=None, metavar="RECORD",
                   help="validate: predict again (from --calibration) the runs of an earlier "
                        "record instead of running them")



# ---------------------------------------------------------------------------- docs tables
PAGES = ("plan.md", "questions.md")
A100_RECORD = "docs/reference/plan-a100.json"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _tp_story(a100: dict) -> str:
    """Where the layouts with tensor parallelism inside a node and across nodes rank."""
    per_node = a100["cluster"]["per_node"]
    ranked = a100["ranked"]
    inside = [(i, p) for i, p in enumerate(ranked, 1) if 1 < p["layout"]["tp"] <= per_node]
    across = [(i, p) for i, p in enumerate(ranked, 1) if p["layout"]["tp"] > per_node]
    text = []
    for what, found in (("inside a node", inside), ("across nodes", across)):
        if found:
            i, p = found[0]
            t = p["time"]
            text.append(f"the fastest with TP {what} is #{i} of {len(ranked)}, {p['label']}: "
                        f"{t['total']:.1f} s, of which TP all-reduces {t['comm']['tp']:.1f} s and "
                        f"pipeline sends {t['comm']['pp']:.1f} s")
    return ("\n\nAmong the rest, " + "; ".join(text) + ".") if text else ""


def tables(rec: dict, a100: dict) -> dict[str, str]:
    """The docs' tables from the validation record and the worked example's ranking."""
    s = rec["summary"]
    rho = s["spearman"]
    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"
    hit, groups = (int(x) for x in s["best_within_5pct"].split("/"))
    out = {"summary": "\n".join([
        "| figure | goal | result | goal met |", "|---|---|---|---|",
        f"| layouts run | >= 30 | {s['layouts']} | {met(s['layouts'] >= 30)} |",
        f"| memory (model states + activations), mean / max error | exact / 3% | "
        f"{_pct(s['mape_memory'])} / {_pct(s['max_ape_memory'])} | "
        f"{met(s['max_ape_memory'] <= 0.03)} |",
        f"| step time, mean absolute error | <= 10% | {_pct(s['mape_time'])} | "
        f"{met(s['mape_time'] <= 0.10)} |",
        f"| step time, max absolute error | <= 25% | {_pct(s['max_ape_time'])} "
        f"({s['worst_time']}) | {met(s['max_ape_time'] <= 0.25)} |",
        f"| Spearman rank correlation, all layouts | >= 0.9 | {rho:.3f} | {met(rho >= 0.9)} |",
        f"| Spearman within each group, mean | | {s['spearman_within_groups_mean']:.3f} | |",
        f"| predicted best within 5% of measured best | every group | "
        f"{s['best_within_5pct']} groups | {met(hit == groups)} |"])}
    rows = ["| preset | nodes x ranks | link | layout | measured ms | predicted ms | error | "
            "memory MiB (= predicted) |", "|---|---|---|---|---|---|---|---|"]
    for r in rec["layouts"]:
        same = "=" if r["ape_memory"] == 0 else f"{_pct(r['ape_memory'])} off"
        rows.append(f"| {r['preset']} | {r['nodes']} x {r['per_node']} | {r['rate']} | "
                    f"{r['label']} | {r['measured']['step_s'] * 1e3:.2f} | "
                    f"{r['predicted']['step_s'] * 1e3:.2f} | "
                    f"{(r['predicted']['step_s'] / r['measured']['step_s'] - 1) * 100:+.1f}% | "
                    f"{r['measured']['memory'] / 2**20:.2f} {same} |")
    out["layouts"] = "\n".join(rows)
    rows = ["| group | layouts | predicted best | measured best | its gap |",
            "|---|---|---|---|---|"]
    for g, b in s["groups"].items():
        rows.append(f"| {g} | {b['layouts']} | {b['predicted_best']} | {b['measured_best']} | "
                    f"{b['gap'] * 100:+.1f}% |")
    out["groups"] = "\n".join(rows)
    rows = ["| # | layout | GiB a GPU (weights/grads/optimizer/activations) | step s "
            "(predicted) | compute | offload copies | bubble | exposed comm dp/tp/pp | "
            "why slower than #1 |", "|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(a100["ranked"][:6], 1):
        m, t = p["memory"], p["time"]
        cats = "/".join(f"{m[k] / 2**30:.1f}" for k in ("params", "grads", "optimizer",
                                                         "activations"))
        comm = "/".join(f"{t['comm'][k]:.2f}" for k in ("dp", "tp", "pp"))
        rows.append(f"| {i} | {p['label']} | {m['total'] / 2**30:.1f} ({cats}) | "
                    f"{t['total']:.2f} | {t['compute']:.2f} | {t['optimizer']:.2f} | "
                    f"{t['bubble']:.2f} | {comm} | "
                    f"{p.get('why_not_best', 'best')} |")
    out["a100"] = "\n".join(rows) + f"\n\nThe top choice: {a100['command']}" + _tp_story(a100)
    best = a100["ranked"][0]
    out["q18"] = (f"`dtlab plan` on 4 such nodes (a 32-layer, d_model 4096 model, 512 sequences "
                  f"of 2048 tokens; datasheet peaks and links) predicts **{best['label']}** "
                  f"fastest at {best['time']['total']:.2f} s a step and "
                  f"{best['memory']['total'] / 2**30:.1f} GiB a GPU, a prediction, not a "
                  f"measurement ([plan.md](plan.md#worked-example-many-8xa100-nodes-questions-"
                  f"18-and-19); its validation here: step time within "
                  f"{s['mape_time'] * 100:.0f}% on average over {s['layouts']} real runs).")
    return out


def make_parser():
    from dtlab.report.records import record_tool_parser  # torch: the CLI parser imports this
    return record_tool_parser("python -m dtlab.plan.validate",
                              "docs/plan.md's tables and picture from a plan validate record")


if __name__ == "__main__":
    from dtlab.report.records import fill_marked_tables
    a = make_parser().parse_args()
    record = json.loads(Path(a.json).read_text())
    if a.img:
        print(f"picture: {plot(record['layouts'], Path(a.img) / 'plan-validate.png')}")
    if a.docs:
        changed = fill_marked_tables(Path(a.docs), PAGES, "plan",
                                     tables(record, json.loads(Path(A100_RECORD).read_text())))
        print(f"rewrote: {', '.join(changed) or 'nothing'}")
