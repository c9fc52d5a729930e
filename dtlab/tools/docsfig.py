"""The figures and tables of docs/ that come from the reference tour and the collective
benchmark (docs/reference/tour.json, comm.json): what ``dtlab docs refresh`` writes between
``<!-- ref:NAME -->`` markers and into ``<!--fig:NAME-->`` spans, one function each, so a figure
quoted on several pages is the same number from the same run everywhere."""
from __future__ import annotations

import json
from pathlib import Path

from dtlab.tools.report import REPORT_COLUMNS, exposed_share, human_bytes, report_row

PAGES = ("tour.md", "profiling.md", "ring-allreduce.md", "ddp.md", "index.md", "pipeline.md",
         "cluster.md", "debugging.md", "doctor.md", "reliability.md", "plan.md")


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


def _span(xs: list[float], unit: str = "") -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}{unit}"


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

    shares = [exposed_share(s) for s in runs if s["world_size"] > 1 and exposed_share(s)]

    def ring64(rows):
        return next(r["busbw_vs_library"] for r in rows if r["impl"] == "ring" and
                    r["world_size"] == 2 and r["bytes"] == 64 * 2**20)
    return {
        **per_run, **lab_figures(ref_dir),
        **cluster_figures(_load(ref_dir, "cluster.json")),
        **restart_figures(_load(ref_dir, "reliability-restart.json")),
        **plan_figures(_load(ref_dir, "plan-validate.json"),
                       _load(ref_dir, "plan-calibration.json")),
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


def plan_figures(rec: dict, cal: dict) -> dict[str, str]:
    """The validation's errors by kind of layout (signed: + the prediction was slower), for the
    prose of docs/plan.md: context parallelism, TP, recomputation and pipelines on 2 ranks, the
    tiny preset in one process; the memory of CP; the spread of the calibration's repeated
    reference runs."""
    def err(r):
        return r["predicted"]["step_s"] / r["measured"]["step_s"] - 1

    def pct(xs):
        lo, hi = min(abs(x) for x in xs), max(abs(x) for x in xs)
        return f"{lo:.0%}" if round(lo, 2) == round(hi, 2) else f"{lo:.0%}-{hi:.0%}"
    rows = rec["layouts"]
    lay = [(r, r["layout"]) for r in rows]
    cp = [r for r, x in lay if x.get("cp", 1) > 1]
    tp = [err(r) for r, x in lay if x.get("tp", 1) > 1 and x.get("cp", 1) == 1]
    two = [err(r) for r, x in lay if r["nodes"] * r["per_node"] == 2 and x.get("cp", 1) == 1
           and (x.get("recompute", "none") != "none" or x.get("pp", 1) > 1)]
    tiny1 = next(r for r in rows if r["preset"] == "tiny" and r["label"] == "dp1")
    runs = [sorted(v) for v in cal["sync_runs_s"].values()]
    return {"plan.err.cp": pct([err(r) for r in cp]),
            "plan.err.cp.memory": " and ".join(f"{r['ape_memory']:.2%}" for r in cp),
            "plan.err.tp": pct([e for e in tp if e < 0]),
            "plan.err.tp.under": f"{sum(e < 0 for e in tp)} of {len(tp)}",
            "plan.err.two": pct([e for e in two if e > 0]),
            "plan.err.two.over": f"{sum(e > 0 for e in two)} of {len(two)}",
            "plan.err.tiny1": f"{err(tiny1):+.0%}",
            "plan.repeat": pct([b / a - 1 for a, b in runs])}


def lab_figures(ref_dir: Path) -> dict[str, str]:
    """Figures of docs/reference/labs.json (python -m dtlab.tools.labruns) and of the schedule
    record: bubbles, overlap, the small preset."""
    runs = _load(ref_dir, "labs.json")["runs"]
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
                "ddp.batch24.param":
                    f"{runs['ddp-torch-w2-batch24']['baseline']['max_abs_param_diff']:.1e}"})
    for name in ("mp-w4", "dp-r4", "accelerate-bf16", "accelerate-fp16", "accelerate-accum2"):
        out[f"{name}.rel"] = _sci(runs[name])
        out[f"{name}.param"] = f"{runs[name]['baseline']['max_abs_param_diff']:.1e}"
    zero = [s for n, s in runs.items() if n.startswith("zero-small-")]
    out["zero-small.rel"] = f"{max(s['baseline']['max_rel_loss_diff'] for s in zero):.1e}"
    out["zero-small.param"] = f"{max(s['baseline']['max_abs_param_diff'] for s in zero):.1e}"
    for r in _load(ref_dir, "long-sequences.json")["recompute_step_time"]:
        out[f"recompute.{r['recompute']}.ratio"] = f"{r['ratio']:.2f}x"
    for r in _load(ref_dir, "schedules-experts.json")["pipelines"]:
        key = f"sched.{r['schedule']}.p{r['P']}.v{r['V']}.m{r['M']}"
        out[key] = f"{r['bubble_measured']:.3f}"
        out[f"{key}.theory"] = f"{r['bubble_theory']:.3f}"
    return out


def _slug(text: str) -> str:
    return text.replace(" @ ", "-").replace(" ", "-")


def cluster_figures(c: dict) -> dict[str, str]:
    """cluster.STRATEGY.WHERE.{step_ms,exposed}, cluster.STRATEGY.ratio (100mbit over one
    node), cluster.3d.RATE.{inside,across,ratio}, cluster.STRATEGY.mib and .wire_ms (its bytes
    at 100mbit)."""
    out = {}
    by = {(s["strategy"], s["where"]): s for s in c["strategies"]}
    for (name, where), s in by.items():
        key = f"cluster.{_slug(name)}.{_slug(where)}"
        out[f"{key}.step_ms"] = f"{s['step_ms']:.0f} ms"
        out[f"{key}.exposed"] = _pct(s["exposed_communication"])
        out[f"cluster.{_slug(name)}.mib"] = f"{s['comm_bytes_per_step'] / 2**20:.2f} MiB"
        out[f"cluster.{_slug(name)}.wire_ms"] = f"{s['comm_bytes_per_step'] / 12.5e6 * 1e3:.0f} ms"
        slow = by.get((name, "2 nodes @ 100mbit"))
        if slow and where == "1 node":
            out[f"cluster.{_slug(name)}.ratio"] = f"{slow['step_ms'] / s['step_ms']:.1f}x"
    shaped = [r["busbw_over_link"] for r in c["links"] if r["rate"] in ("100mbit", "1gbit")
              and r["bytes"] == 8 * 2**20]
    out["cluster.links.shaped"] = f"{min(shaped):.2f}-{max(shaped):.2f}"
    fast = [r["busbw_GBps"] * 8 for r in c["links"] if r["rate"] in ("10gbit", "unshaped")
            and r["bytes"] == 8 * 2**20]
    out["cluster.links.cpu"] = f"{min(fast):.1f}-{max(fast):.1f} Gbit/s"
    sent = [s["comm_bytes_per_step"] for s in c["strategies"]]
    out["cluster.bytes_spread"] = f"{max(sent) / min(sent):.0f}x"
    for r in c["parallel3d"]:
        key = f"cluster.3d.{r['rate']}"
        out.update({f"{key}.inside": f"{r['tp_inside_node_ms']:.0f} ms",
                    f"{key}.across": f"{r['tp_across_nodes_ms']:.0f} ms",
                    f"{key}.ratio": f"{r['across_over_inside']:.2f}x"})
    return out


def cluster_links_table(c: dict, size: int = 8 * 2**20) -> str:
    rows = ["| link | ranks/node | gloo busbw (Gbit/s) | our ring busbw (Gbit/s) | link allows | "
            "gloo / link | ring / link |", "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["rate"], r["ranks_per_node"]) for r in c["links"]))
    for rate, k in keys:
        lib, ring = (next(r for r in c["links"] if (r["rate"], r["ranks_per_node"], r["impl"],
                                                      r["bytes"]) == (rate, k, impl, size))
                     for impl in ("library", "ring"))
        allows = lib.get("link_allows_GBps")
        cells = [f"{lib['busbw_GBps'] * 8:.3f}", f"{ring['busbw_GBps'] * 8:.3f}"]
        cells += ["-", "-", "-"] if not allows else [
            f"{allows * 8:.1f}", f"{lib['busbw_GBps'] / allows:.2f}",
            f"{ring['busbw_GBps'] / allows:.2f}"]
        rows.append(f"| {rate} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cluster_strategies_table(c: dict) -> str:
    rows = ["| strategy | bytes/step/rank | 1 node: step ms (exposed comm) | 2 nodes @ 1gbit | "
            "2 nodes @ 100mbit | 100mbit / 1 node |", "|---|---|---|---|---|---|"]
    by = {(s["strategy"], s["where"]): s for s in c["strategies"]}
    for name in dict.fromkeys(s["strategy"] for s in c["strategies"]):
        cells = [by[(name, w)] for w in ("1 node", "2 nodes @ 1gbit", "2 nodes @ 100mbit")]
        rows.append(f"| {name} | {cells[0]['comm_bytes_per_step'] / 2**20:.2f} MiB | "
                    + " | ".join(f"{s['step_ms']:.0f} ({_pct(s['exposed_communication'])})"
                                 for s in cells)
                    + f" | {cells[2]['step_ms'] / cells[0]['step_ms']:.1f}x |")
    return "\n".join(rows)


def cluster_3d_table(c: dict) -> str:
    rows = ["| link | TP inside a node, PP across: step ms | TP across nodes, PP inside: step ms "
            "| across / inside |", "|---|---|---|---|"]
    rows += [f"| {r['rate']} | {r['tp_inside_node_ms']:.0f} | {r['tp_across_nodes_ms']:.0f} | "
             f"{r['across_over_inside']:.2f}x |" for r in c["parallel3d"]]
    return "\n".join(rows)


def hang_table(h: dict) -> str:
    """The desync report's record (dtlab bench hang): right, in time, how soon."""
    rows = ["| fault | runs | report right | within the limit | detection median | max |",
            "|---|---|---|---|---|---|"]
    for name, f in h["faults"].items():
        rows.append(f"| {name} | {f['runs']} | {f['correct']}/{f['runs']} | "
                    f"{f['within_limit']}/{f['runs']} (limit {h['limit_s']:g} s) | "
                    f"{f['detect_s_median']:.2f} s | {f['detect_s_max']:.2f} s |")
    m = h["machine"]
    rows += ["", f"(`{h['command']}`, {h['date']}, {m['cores']} cores {m['cpu']}, "
                 f"torch {m['torch']}.)"]
    return "\n".join(rows)


def doctor_cases(rec: dict) -> str:
    """Each case of the doctor's record: its command, exit status and time, and what it said
    (errors and warnings, the collective's lines), wrapped as the page shows them."""
    import textwrap
    out = [f"Recorded on a 3-node namespace cluster with 200mbit links (`python -m "
           f"dtlab.tools.doctorcases --json docs/reference/doctor-collective.json`, "
           f"{rec['date']}); each case's errors and the collective's verdict:\n"]
    for name, c in rec["cases"].items():
        out.append(f"**{name}** (`{c['command']}`; exit {c['exit_status']}, {c['seconds']} s):\n")
        lines = []
        for f in c["findings"]:
            if f["severity"] in ("error", "warn") or f["check"] == "collective":
                lines += textwrap.wrap(f"{f['severity']:5} {f['check']:11} {f['message']}",
                                       width=100, subsequent_indent=" " * 18)
        coll = c.get("collective") or {}
        if not lines and coll.get("ok"):
            errors = sum(f["severity"] == "error" for f in c["findings"])
            lines.append(f"collective ok   busbw {coll['busbw_GBps']:.4f} GB/s, "
                         f"{coll['seconds']} s; {errors} error(s)")
        out.append("```\n" + "\n".join(lines) + "\n```\n")
    return "\n".join(out).rstrip()


def resharding_table(rec: dict) -> str:
    """Written at one layout, resumed at another: the distance from the baseline of the whole
    run and the checkpoint writes."""
    def layout(cmd: str) -> str:
        words = cmd.split()[2:]  # after `dtlab run`
        keep, skip = [], {"--steps", "--ckpt-dir", "--ckpt-every", "--out"}
        while words:
            w = words.pop(0)
            if w in skip:
                words.pop(0)
            elif w != "--no-baseline":
                keep.append(w)
        return " ".join(keep)
    rows = ["| written by | resumed by | max rel loss diff | max abs param diff | checkpoint "
            "write (ms) |", "|---|---|---|---|---|"]
    for r in rec["rows"]:
        w = [s * 1e3 for s in r["ckpt_write_s"]]
        same = " (same layout)" if layout(r["written"]) == layout(r["resumed"]) else ""
        rows.append(f"| `{layout(r['written'])}` | `{layout(r['resumed'])}`{same} | "
                    f"{r['max_rel_loss_diff']:.1e} | {r['max_abs_param_diff']:.1e} | "
                    f"{min(w):.0f}-{max(w):.0f} |")
    return "\n".join(rows)


def restart_figures(rec: dict) -> dict[str, str]:
    w = [s * 1e3 for s in rec["ckpt_write_s"]]
    chunks = [b for k, b in rec["checkpoint_bytes"].items() if k.endswith(".distcp")]
    fail_at = int(rec["command"].split("--fail-at-step")[1].split()[0])
    return {"restart.wall": f"{rec['wall_s_with_restart']:.1f} s",
            "restart.exit": str(rec["exit_status"]),
            "restart.rel": f"{rec['max_rel_loss_diff']:.1e}",
            "restart.write": f"{min(w):.0f}-{max(w):.0f} ms",
            "restart.step": f"{rec['step_s_median'] * 1e3:.0f} ms",
            "restart.chunk": f"{max(chunks) / 2**20:.1f} MiB",
            "restart.metadata": f"{rec['checkpoint_bytes']['.metadata'] / 1e3:.0f} KB",
            "restart.lost": str(fail_at - rec["checkpoint"]["resumed_from"])}


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
            formula = 2 * (w - 1) / w * 4 * s["n_params"]
            rows.append(f"| {w} | {a} | {_sci(s)} | {s['baseline']['max_abs_param_diff']:.1e} | "
                        f"{_count(s['comm']['bytes_per_step'])} | {_count(formula)} |")
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
            "busbw": busbw_table(_load(ref_dir, "comm.json")["rows"]),
            **{k: f(_load(ref_dir, "labs.json")["runs"]) for k, f in
               (("bubble", bubble_table), ("overlap", overlap_table), ("owndp", own_ddp_table))},
            **{k: f(_load(ref_dir, "cluster.json")) for k, f in
               (("links", cluster_links_table), ("strategies", cluster_strategies_table),
                ("grid", cluster_3d_table))},
            "hang": hang_table(_load(ref_dir, "hang.json")),
            "doctor": doctor_cases(_load(ref_dir, "doctor-collective.json")),
            "resharding": resharding_table(_load(ref_dir, "resharding.json"))}
