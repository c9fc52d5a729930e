"""The figures and tables of docs/ that come from lab runs: the reference tour, the lab runs
beyond it and the collective benchmark (docs/reference/tour.json, labs.json, comm.json, and the
schedule record's bubbles). What ``dtlab docs refresh`` writes between ``<!-- ref:NAME -->``
markers and into ``<!--fig:NAME-->`` spans, one function each, so a figure quoted on several
pages is the same number from the same run everywhere. The records of the cluster, the doctor,
the hang detector, the checkpoints and the planner are docsops.py's."""
from __future__ import annotations

import json
from pathlib import Path

from dtlab.costmodel.shapes import ring_factor
from dtlab.report.tables import REPORT_COLUMNS, exposed_share, human_bytes, profile_shares, report_row

PAGES = ("tour.md", "profiling.md", "ring-allreduce.md", "ddp.md", "pipeline.md")


def load(ref_dir: Path, name: str) -> dict:
    """One record of docs/reference/."""
    return json.loads((Path(ref_dir) / name).read_text())


def find(runs: list[dict], lab: str, variant: str = "", world: int | None = None) -> dict:
    """The tour run of ``lab`` whose variant starts with ``variant``."""
    for s in runs:
        if s["lab"] == lab and s["variant"].startswith(variant) and \
                (world is None or s["world_size"] == world):
            return s
    raise KeyError(f"the tour record has no run {lab} {variant} (docs/reference/tour.json)")


def _ms(s: dict) -> str:
    return f"{s['time']['step_s_median'] * 1e3:.1f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _span(xs: list[float], unit: str = "") -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}{unit}"


def _sci(s: dict) -> str:
    """A run's largest relative loss difference from the baseline."""
    x = s["baseline"].get("max_rel_loss_diff")
    return "-" if x is None else f"{x:.1e}"


def _param(s: dict) -> str:
    """A run's largest absolute parameter difference from the baseline."""
    x = s["baseline"].get("max_abs_param_diff")
    return "-" if x is None else f"{x:.1e}"


def _dp_formula(s: dict) -> float:
    """What a data-parallel rank sends a step for the run's parameters: 2(W-1)/W x 4P."""
    return ring_factor("all_reduce", s["world_size"]) * 4 * s["n_params"]


def _peak_mib(s: dict) -> str:
    return human_bytes(max(m["peak"] for m in s["memory"]["per_rank"]))


def machine_line(m: dict, date: str) -> str:
    return (f"{m['cores']} CPU cores ({m['cpu']}), {m['memory_gib']:g} GiB, torch {m['torch']}, "
            f"DeepSpeed {m['deepspeed']}, Python {m['python']}, {date}")


def figures(ref_dir: Path) -> dict[str, str]:
    tour = load(ref_dir, "tour.json")
    runs = tour["runs"]
    base, ddp = find(runs, "baseline"), find(runs, "ddp", "torch")
    own = find(runs, "ddp", "own")
    f = ddp["flops"]
    bad = len(tour["failed"])
    comm = load(ref_dir, "comm.json")["rows"]
    shm = load(ref_dir, "faster-collectives.json")["host"]["rows"]

    def lib64(rows):
        return next(r["busbw_GBps"] for r in rows if r["impl"] == "library" and
                    r["world_size"] == 2 and r["bytes"] == 64 * 2**20 and r["op"] == "all_reduce")
    per_run = {}  # run.LAB.VARIANT.{rel,param,step_ms,exposed} for every run of the tour
    for s in runs:
        key = f"run.{s['lab']}.{s['variant']}"
        per_run.update({f"{key}.rel": _sci(s), f"{key}.param": _param(s),
                        f"{key}.step_ms": _ms(s), f"{key}.exposed": _pct(exposed_share(s))})

    shares = [exposed_share(s) for s in runs if s["world_size"] > 1 and exposed_share(s)]

    def ring64(rows):
        return next(r["busbw_vs_library"] for r in rows if r["impl"] == "ring" and
                    r["world_size"] == 2 and r["bytes"] == 64 * 2**20)
    return {
        **per_run, **lab_figures(ref_dir),
        "tour.head": f"{len(runs)} runs in {tour['wall_s']:.0f} s, "
                     + ("all within tolerance, exit status 0" if not bad else
                        f"{bad} NOT OK, exit status 1"),
        "tour.machine": machine_line(tour["machine"], tour["date"]),
        "baseline.step_ms": _ms(base),
        "baseline.tokens_per_s": f"{base['time']['tokens_per_s']:,.0f}",
        "baseline.resident": _peak_mib(base),
        "baseline.steps": str(base["steps"]),
        "ddp.step_ms": _ms(ddp),
        "ddp-own.step_ms": _ms(own),
        "ddp.exposed": _pct(exposed_share(ddp)),
        "ddp-own.exposed": _pct(exposed_share(own)),
        "ddp.sent": human_bytes(ddp["comm"]["bytes_per_step"]),
        "amp-fp16.step_ms": _ms(find(runs, "amp", "fp16")),
        "amp-bf16.step_ms": _ms(find(runs, "amp", "bf16")),
        "amp.bf16.rel": _sci(find(runs, "amp", "bf16")),
        "dataparallel.step_ms": _ms(find(runs, "dataparallel", "own")),
        "dataparallel.rel": _sci(find(runs, "dataparallel", "own")),
        "mp.rel": _sci(find(runs, "torch_multiprocessing", "sync")),
        "tour.runs": str(len(runs)),
        "tour.exposed_range": f"{min(shares):.0%}-{max(shares):.0%}",
        "tour.minutes": f"{tour['wall_s'] / 60:.1f}",
        "comm.ring64": f"{ring64(comm):.2f}x",
        "zero3.exposed": _pct(exposed_share(find(runs, "zero", "own-stage3"))),
        "tp.exposed": _pct(exposed_share(find(runs, "tensor_parallel", "own"))),
        "pp.exposed": _pct(exposed_share(find(runs, "pipeline", "own-1f1b"))),
        "mfu.flops": f"{f['model_flops_per_step']:,}",
        "mfu.achieved": f"{f['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s",
        "mfu.peak": f"{f['peak_flops_per_s_per_device'] / 1e9:.1f} GFLOP/s",
        "mfu.shapes": str(len(f["matmul_sweep"])),
        "mfu.mfu": f"{f['mfu']:.1%}",
        "mfu.of_matmul": f"{f['of_matmul_peak']:.1%}",
        "mfu.sweep": ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['flops_per_s'] / 1e9:.0f}"
                               for r in f["matmul_sweep"]) + " GFLOP/s",
        "comm.lib64": f"{lib64(comm):.3f}",
        "comm.ring_large": _span([r["busbw_vs_library"] for r in comm if r["impl"] == "ring"
                                  and r["bytes"] >= 16 * 2**20], "x"),
        "comm.copies64": _span([r["busbw_vs_library"] for r in comm if r["impl"] in
                                ("naive", "tree") and r["bytes"] == 64 * 2**20], "x"),
        "commexp.lib64": f"{lib64(shm):.3f}",
    }


def lab_figures(ref_dir: Path) -> dict[str, str]:
    """Figures of docs/reference/labs.json (python -m dtlab.docsgen.records.lab_runs) and of the schedule
    record: bubbles, overlap, the small preset."""
    runs = load(ref_dir, "labs.json")["runs"]
    out = {}
    for name, s in runs.items():
        x = s["extra"]
        if s["lab"] == "pipeline":
            p, m = x["stages"], x["microbatches"]
            out[f"bubble.{x['schedule']}.p{p}.m{m}"] = f"{x['bubble_measured']:.3f}"
            out[f"bubble.theory.p{p}.m{m}"] = f"{x['bubble_theory']:.3f}"
            out[f"bubble.{x['schedule']}.p{p}.m{m}.mb"] = " / ".join(
                f"{b / 1e6:.2f}" for b in x["peak_live_activation_bytes"]) + " MB"
        if "overlap_timing" in x and name.startswith("ddp-overlap"):
            key = name.removeprefix("ddp-overlap-")
            out[f"overlap.{key}.wait_ms"] = \
                f"{x['overlap_timing']['wait_after_backward_s_median'] * 1e3:.1f} ms"
    pipes = [s["extra"] for s in runs.values() if s["lab"] == "pipeline"]
    gap = max(abs(x["bubble_measured"] - x["bubble_theory"]) for x in pipes)
    out["bubble.max_gap"] = f"{gap:.3f}"
    small, base = runs["ddp-torch-small"], runs["baseline-small"]
    out.update({"small.ddp.step_ms": _ms(small), "small.baseline.step_ms": _ms(base),
                "small.ddp.rel": _sci(small),
                "small.ddp.sent": f"{small['comm']['bytes_per_step']:,.0f}",
                "small.baseline.activations":
                    f"{base['memory']['per_rank'][0]['activations_peak'] / 1e6:.1f} MB",
                "ddp.w4.sent": f"{runs['ddp-torch-w4']['comm']['bytes_per_step']:,.0f} B",
                "ddp.w4.step_ms": _ms(runs["ddp-torch-w4"]),
                "ddp.w4.rel": _sci(runs["ddp-torch-w4"]),
                "ddp.batch24.rel": _sci(runs["ddp-torch-w2-batch24"]),
                "ddp.batch24.param": _param(runs["ddp-torch-w2-batch24"])})
    for name in ("mp-w4", "dp-r4", "accelerate-bf16", "accelerate-fp16", "accelerate-accum2"):
        out[f"{name}.rel"] = _sci(runs[name])
        out[f"{name}.param"] = _param(runs[name])
    zero = [s for n, s in runs.items() if n.startswith("zero-small-")]
    out["zero-small.rel"] = f"{max(s['baseline']['max_rel_loss_diff'] for s in zero):.1e}"
    out["zero-small.param"] = f"{max(s['baseline']['max_abs_param_diff'] for s in zero):.1e}"
    for r in load(ref_dir, "long-sequences.json")["recompute_step_time"]:
        out[f"recompute.{r['recompute']}.ratio"] = f"{r['ratio']:.2f}x"
    for r in load(ref_dir, "schedules-experts.json")["pipelines"]:
        key = f"sched.{r['schedule']}.p{r['P']}.v{r['V']}.m{r['M']}"
        out[key] = f"{r['bubble_measured']:.3f}"
        out[f"{key}.theory"] = f"{r['bubble_theory']:.3f}"
    return out


def bubble_table(runs: dict) -> str:
    rows = ["| P | M | theory | GPipe measured | 1F1B measured | GPipe live micro-batches | "
            "1F1B live micro-batches |", "|---|---|---|---|---|---|---|"]
    for p in (2, 4):
        for m in (1, 2, 4, 8):
            g, f = (runs[f"pipeline-{s}-p{p}-m{m}"]["extra"] for s in ("gpipe", "1f1b"))
            rows.append(f"| {p} | {m} | {g['bubble_theory']:.3f} | {g['bubble_measured']:.3f} | "
                        f"{f['bubble_measured']:.3f} | {g['peak_live_microbatches']} | "
                        f"{f['peak_live_microbatches']} |")
    return "\n".join(rows)


def overlap_table(runs: dict) -> str:
    rows = ["| all-reduce | overlap | backward ms | wait after backward ms | step ms |",
            "|---|---|---|---|---|"]
    for a in ("ring", "library"):
        for o in ("yes", "no"):
            s = runs[f"ddp-overlap-{a}-{o}"]
            t = s["extra"]["overlap_timing"]
            rows.append(f"| {a} | {o if o == 'yes' else 'no (`--no-overlap`)'} | "
                        f"{t['backward_s_median'] * 1e3:.1f} | "
                        f"{t['wait_after_backward_s_median'] * 1e3:.1f} | "
                        f"{s['time']['step_s_median'] * 1e3:.1f} |")
    return "\n".join(rows)


def _count(x: float) -> str:
    """Bytes: whole numbers as such, a fraction (a modelled share) to one decimal."""
    return f"{x:,.0f}" if x == int(x) else f"{x:,.1f}"


def own_ddp_table(runs: dict) -> str:
    rows = ["| W | all-reduce | max rel loss diff | max abs param diff | sent / rank / step | "
            "2(W-1)/W x 4P |", "|---|---|---|---|---|---|"]
    for w in (2, 3, 4):
        for a in ("ring", "library"):
            s = runs[f"ddp-own-w{w}-{a}"]
            rows.append(f"| {w} | {a} | {_sci(s)} | {_param(s)} | "
                        f"{_count(s['comm']['bytes_per_step'])} | {_count(_dp_formula(s))} |")
    return "\n".join(rows)


def tour_table(tour: dict) -> str:
    rows = ["| " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * len(REPORT_COLUMNS)]
    rows += ["| " + " | ".join(report_row(s)) + " |" for s in tour["runs"]]
    rows.append("")
    rows += [f"- skipped {n}: {why}" for n, why in tour["skipped"]]
    rows += [f"- FAILED {n}: {why}" for n, why in tour["failed"]]
    return "\n".join(rows)


def profile_table(tour: dict) -> str:
    """The time split of every profiled multi-rank run of the tour, mean over ranks."""
    cols = ("computation", "communication", "overlap", "exposed_communication", "other")
    rows = ["| run | ranks | step ms | comm/step/rank | computation | communication | overlap "
            "| exposed comm | other |", "|---|---|---|---|---|---|---|---|---|"]
    for s in tour["runs"]:
        share = profile_shares(s)
        if s["world_size"] < 2 or share is None:
            continue
        rows.append(f"| {s['lab']} {s['variant']} | {s['world_size']} | "
                    f"{s['time']['step_s_median'] * 1e3:.1f} | "
                    f"{human_bytes(s['comm']['bytes_per_step'])} | "
                    + " | ".join(_pct(share[c]) for c in cols) + " |")
    return "\n".join(rows)


def dp_table(tour: dict) -> str:
    """The data-parallel runs of the tour: distance from the baseline, bytes counted against
    2(W-1)/W x 4P, step time."""
    rows = ["| run | world | max rel loss diff | max abs param diff | sent / rank / step | "
            "2(W-1)/W x 4P | step ms |", "|---|---|---|---|---|---|---|"]
    picks = [("baseline", ""), ("torch_multiprocessing", ""), ("ddp", "torch"), ("ddp", "own"),
             ("ring_allreduce", "ring"), ("ring_allreduce", "tree")]
    for lab, variant in picks:
        try:
            s = find(tour["runs"], lab, variant)
        except KeyError:
            continue
        rows.append(f"| {lab} {s['variant']} | {s['world_size']} | {_sci(s)} | {_param(s)} | "
                    f"{s['comm']['bytes_per_step']:,.0f} B | {_dp_formula(s):,.0f} B | "
                    f"{s['time']['step_s_median'] * 1e3:.1f} |")
    return "\n".join(rows)


def busbw_table(comm: list[dict]) -> str:
    impls = ("library", "ring", "naive", "tree")
    rows = ["| W | size | library (gloo) | ring (ours) | naive | tree |",
            "|---|---|---|---|---|---|"]
    keys = sorted({(r["world_size"], r["bytes"]) for r in comm if r["op"] == "all_reduce"})
    for w, n in keys:
        by = {r["impl"]: r for r in comm if (r["world_size"], r["bytes"]) == (w, n)
              and r["op"] == "all_reduce"}
        cells = []
        for impl in impls:
            r = by.get(impl)
            if r is None:
                cells.append("-")
            elif impl == "library":
                cells.append(f"{r['busbw_GBps']:.3f}")
            else:
                cells.append(f"{r['busbw_GBps']:.3f} ({r['busbw_vs_library']:.2f}x)")
        size = f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"
        rows.append(f"| {w} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def tables(ref_dir: Path) -> dict[str, str]:
    tour = load(ref_dir, "tour.json")
    return {"tour": tour_table(tour), "profile": profile_table(tour), "dp": dp_table(tour),
            "busbw": busbw_table(load(ref_dir, "comm.json")["rows"]),
            **{k: f(load(ref_dir, "labs.json")["runs"]) for k, f in
               (("bubble", bubble_table), ("overlap", overlap_table), ("owndp", own_ddp_table))}}
