"""The figures and tables of docs/ that come from the reference tour and the collective
benchmark (docs/reference/tour.json, comm.json): what ``dtlab docs refresh`` writes between
``<!-- ref:NAME -->`` markers and into ``<!--fig:NAME-->`` spans, one function each, so a figure
quoted on several pages is the same number from the same run everywhere."""
from __future__ import annotations

import json
from pathlib import Path

from dtlab.tools.report import REPORT_COLUMNS, exposed_share, human_bytes, report_row

PAGES = ("tour.md", "profiling.md", "ring-allreduce.md", "ddp.md", "index.md")


def _load(ref_dir: Path, name: str) -> dict:
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


def _sci(s: dict) -> str:
    """A run's largest relative loss difference from the baseline."""
    x = s["baseline"].get("max_rel_loss_diff")
    return "-" if x is None else f"{x:.1e}"


def _peak_mib(s: dict) -> str:
    return human_bytes(max(m["peak"] for m in s["memory"]["per_rank"]))


def machine_line(m: dict, date: str) -> str:
    return (f"{m['cores']} CPU cores ({m['cpu']}), {m['memory_gib']:g} GiB, torch {m['torch']}, "
            f"DeepSpeed {m['deepspeed']}, Python {m['python']}, {date}")


def figures(ref_dir: Path) -> dict[str, str]:
    tour = _load(ref_dir, "tour.json")
    runs = tour["runs"]
    base, ddp = find(runs, "baseline"), find(runs, "ddp", "torch")
    own = find(runs, "ddp", "own")
    f = ddp["flops"]
    bad = len(tour["failed"])
    comm = _load(ref_dir, "comm.json")["rows"]
    shm = _load(ref_dir, "faster-collectives.json")["host"]["rows"]

    def lib64(rows):
        return next(r["busbw_GBps"] for r in rows if r["impl"] == "library" and
                    r["world_size"] == 2 and r["bytes"] == 64 * 2**20 and r["op"] == "all_reduce")
    per_run = {}  # run.LAB.VARIANT.{rel,param,step_ms,exposed} for every run of the tour
    for s in runs:
        b, key = s["baseline"], f"run.{s['lab']}.{s['variant']}"
        per_run.update({f"{key}.rel": _sci(s),
                        f"{key}.param": "-" if b.get("max_abs_param_diff") is None else
                        f"{b['max_abs_param_diff']:.1e}",
                        f"{key}.step_ms": _ms(s), f"{key}.exposed": _pct(exposed_share(s))})

    def ring64(rows):
        return next(r["busbw_vs_library"] for r in rows if r["impl"] == "ring" and
                    r["world_size"] == 2 and r["bytes"] == 64 * 2**20)
    return {
        **per_run,
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
        "commexp.lib64": f"{lib64(shm):.3f}",
    }


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
        prof = [p for p in (s.get("extra", {}).get("profile") or []) if p]
        if s["world_size"] < 2 or not prof:
            continue
        share = {c: sum(p["share_of_step"][c] for p in prof) / len(prof) for c in cols}
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
        w, b = s["world_size"], s["baseline"]
        formula = 2 * (w - 1) / w * 4 * s["n_params"]
        sci = [("-" if b.get(k) is None else f"{b[k]:.1e}")
               for k in ("max_rel_loss_diff", "max_abs_param_diff")]
        rows.append(f"| {lab} {s['variant']} | {w} | {sci[0]} | {sci[1]} | "
                    f"{s['comm']['bytes_per_step']:,.0f} B | {formula:,.0f} B | "
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
    tour = _load(ref_dir, "tour.json")
    return {"tour": tour_table(tour), "profile": profile_table(tour), "dp": dp_table(tour),
            "busbw": busbw_table(_load(ref_dir, "comm.json")["rows"])}
