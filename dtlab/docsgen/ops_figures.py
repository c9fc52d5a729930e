"""The figures and tables of docs/ that come from the records of the multi-node and
operational tools: the namespace cluster's links and strategies (cluster.json), the hang
detector (hang.json), the doctor's cases (doctor-collective.json), the checkpoints
(resharding.json, reliability-restart.json) and the planner's validations (plan-validate.json,
plan-calibration.json; the GPU model's: plan-measured-h100.json, plan-search-1t.json). Rendered by ``dtlab docs refresh`` as docsfig.py renders the lab runs'."""
from __future__ import annotations

import textwrap
from pathlib import Path

from dtlab.docsgen.lab_figures import _pct, load

PAGES = ("cluster.md", "debugging.md", "doctor.md", "reliability.md", "plan.md", "memory.md")


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


def plan_goal_figures(rec: dict) -> dict[str, str]:
    """The validation's summary against its goals, and the errors of the single-process runs
    of the small and long presets (over-predicted), for the prose of docs/plan.md."""
    s = rec["summary"]
    one = [r["predicted"]["step_s"] / r["measured"]["step_s"] - 1 for r in rec["layouts"]
           if r["nodes"] * r["per_node"] == 1 and r["preset"] != "tiny"]
    return {"plan.goal.mape": f"{s['mape_time']:.1%}",
            "plan.goal.max": f"{s['max_ape_time']:.1%}",
            "plan.goal.spearman": f"{s['spearman']:.3f}",
            "plan.goal.spearman.groups": f"{s['spearman_within_groups_mean']:.3f}",
            "plan.err.one": f"{min(one):+.0%} to {max(one):+.0%}",
            "plan.err.one.runs": str(len(one))}


def measured_table(rec: dict) -> str:
    """The GPU model against the measured sweep, one row a held-out model and one for all."""
    lines = ["| held out | runs | step-time MAPE (stalls out) | over every run | Spearman | "
             "stalls | memory within 15% | best layout within 5% |", "|---|---|---|---|---|---|---|---|"]
    every = dict(rec["leave_one_model_out"], held_out="all three folds")
    for f in [*rec["folds"], every]:
        t, a = f["time"], f["time_all_rows"]
        lines.append(f"| {f['held_out']} | {a['rows']} | {t['mape']:.1%} | {a['mape']:.1%} | "
                     f"{t['spearman']:.3f} | {f['stalls']} | {f['memory_within_15pct']:.1%} | "
                     f"{f['cells_within_5pct']} of {f['cells']} cells |")
    return "\n".join(lines)


def constants_table(rec: dict) -> str:
    """The six fitted constants (fit on every row) and what each one is."""
    lines = ["| constant | value (fit on every run) | what it is |", "|---|---|---|"]
    for name, c in rec["fit_all_rows"]["constants"].items():
        v = c["value"]
        shown = (f"{v / 1e9:.2f} GB" if name == "overhead" else
                 f"{v * 1e3:.2f} ms" if v < 0.1 else f"{v:.3f}")
        lines.append(f"| `{name}` | {shown} | {c['meaning']} |")
    return "\n".join(lines)


def search_table(rec: dict, top: int = 5) -> str:
    """The 1T search's best layouts: step time by part, MFU, memory of the busiest GPU."""
    lines = ["| layout | step (s) | compute | DP | TP | PP | bubble | other | MFU | GB a GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["ranked"][:top]:
        t = r["time"]
        lines.append(f"| {r['label']} | {t['total']:.1f} | " + " | ".join(
            f"{t[k]:.1f}" for k in ("compute", "dp", "tp", "pp", "bubble", "other"))
            + f" | {r['mfu']:.1%} | {r['memory']['total'] / 1e9:.1f} |")
    return "\n".join(lines)


def gpu_plan_figures(search: dict) -> dict[str, str]:
    return {"plan.gpu.1t.wall": f"{search['wall_s_median'] * 1e3:.0f} ms",
            "plan.gpu.1t.named": f"{search['layouts_named']:,}",
            "plan.gpu.1t.costed": f"{search['layouts_costed']:,}"}


def gpu_stall_figures(measured: dict) -> dict[str, str]:
    """The stalls of the measured H100 sweep: how many, and the time each loses a micro-batch
    beyond the prediction ((measured - predicted) / micro-batches), its middle 80%."""
    import re
    import statistics
    lost = sorted((r["measured_s"] - r["predicted_s"]) /
                  int(re.search(r"ga(\d+)", r["layout"]).group(1))
                  for r in measured["stall_rows"])
    dec = statistics.quantiles(lost, n=10)
    return {"plan.gpu.stalls": str(len(lost)),
            "plan.gpu.stall.lost": f"{dec[0]:.1f} to {dec[-1]:.1f} s"}


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


def cluster_bytes_figures(c: dict) -> dict[str, str]:
    """cluster.3d.mib (what a rank of the 3D grid sends a step, the same in both orders) and
    cluster.zero3.over_ddp (ZeRO-3's bytes a step over DDP's)."""
    grid = {r["comm_bytes_per_step"] for g in c["parallel3d"] for r in g["rows"].values()}
    sent = {s["strategy"]: s["comm_bytes_per_step"] for s in c["strategies"]}
    return {"cluster.3d.mib": " or ".join(f"{b / 2**20:.1f} MiB" for b in sorted(grid)),
            "cluster.zero3.over_ddp": f"{sent['zero stage 3'] / sent['ddp']:.1f}"}


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
    out = [f"Recorded on a 3-node namespace cluster with 200mbit links (`python -m "
           f"dtlab.docsgen.records.doctor_cases --json docs/reference/doctor-collective.json`, "
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


def _mem_row(rec: dict, case: str, stage: int, offload: str) -> dict:
    """One row of a ``dtlab memory --json`` output in docs/reference/memory.json."""
    return next(r for r in rec["estimates"][case]["rows"]
                if r["stage"] == stage and r["offload"] == offload)


def memory_figures(rec: dict) -> dict[str, str]:
    """The estimates docs/memory.md quotes in its prose (memory.json, records/memory_cases.py)."""
    p65 = _mem_row(rec, "65b-4x32", 3, "param")
    gb = {f"mem.7b.s{s}.gpu": _mem_row(rec, "7b-1x8", s, "none")["gpu"]["total"] for s in (0, 2, 3)}
    return {"mem.65b.param.cpu": f"{p65['cpu_per_node']['total'] / 1e9:,.0f} GB",
            "mem.65b.param.ds_cpu": f"{p65['deepspeed']['cpu_per_node'] / 1e9:,.0f} GB",
            "mem.7b.s0.gpu": f"{gb['mem.7b.s0.gpu'] / 1e9:.0f} GB",
            "mem.7b.s2.gpu": f"{gb['mem.7b.s2.gpu'] / 1e9:.2f} GB",
            "mem.7b.s3.gpu": f"{gb['mem.7b.s3.gpu'] / 1e9:.1f} GB",
            # the stage-3 buffer holds the layer's 16-bit weights and gradients: 4 B/param
            "mem.7b.largest":
                f"{_mem_row(rec, '7b-1x8', 3, 'param')['gpu']['layer_buffer'] / 4:,.0f}"}


def memory_tables(rec: dict) -> dict[str, str]:
    """docs/memory.md's tables: ours beside DeepSpeed's estimators, the 65B case, and the
    activation estimate beside the bytes autograd saved."""
    rows = ["| nodes x GPUs | stage | offload | ours GPU GB | DeepSpeed GPU GB | "
            "ours CPU/node x 1.5 | DeepSpeed CPU GB |", "|---|---|---|---|---|---|---|"]
    picks = [("7b-1x8", 2, "none"), ("7b-1x8", 2, "optimizer"), ("7b-1x8", 3, "none"),
             ("7b-1x8", 3, "optimizer"), ("7b-1x8", 3, "param"), ("7b-1x4", 2, "none"),
             ("7b-1x4", 3, "none"), ("7b-2x8", 2, "none"), ("7b-2x8", 2, "optimizer"),
             ("7b-2x8", 3, "optimizer")]
    for case, st, off in picks:
        r, setup = _mem_row(rec, case, st, off), rec["estimates"][case]["setup"]
        ours, ds = r["cpu_per_node"]["total"] * 1.5 / 1e9, r["deepspeed"]["cpu_per_node"] / 1e9
        cpu = (f"{ours:.2f} | {ds:.2f}" if round(ours, 2) == round(ds, 2) else
               f"**{ours:.2f}** | **{ds:.2f}**")
        rows.append(f"| {setup['nodes']} x {setup['gpus_per_node']} | {st} | {off} | "
                    f"{r['gpu']['total'] / 1e9:.2f} | {r['deepspeed']['gpu'] / 1e9:.2f} | {cpu} |")
    big = ["| stage | offload | GPU model states | + activations (ckpt, b=1, s=2048) | fits 32 GB "
           "| CPU per node |", "|---|---|---|---|---|---|"]
    for st, off in ((2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "param")):
        r = _mem_row(rec, "65b-4x32", st, off)
        g = r["gpu"]["total"]
        big.append(f"| {st} | {off} | {g / 1e9:.1f} GB | "
                   f"{(g + r['activations']['checkpointing']) / 1e9:.1f} GB | "
                   f"{'yes' if r['fits_gpu'] else 'no'} | "
                   f"{r['cpu_per_node']['total'] / 1e9:,.0f} GB |")
    acts = ["| preset | micro-batch | saved by autograd (bytes) | estimate (bytes) |",
            "|---|---|---|---|"]
    acts += [f"| {a['preset']} | {a['batch']} | {a['saved_by_autograd']:,} | {a['estimate']:,} |"
             for a in rec["activations"]]
    return {"memds": "\n".join(rows), "mem65b": "\n".join(big), "memacts": "\n".join(acts)}


def reliability_figures(reshard: dict, hang: dict) -> dict[str, str]:
    """docs/reliability.md's prose: the checkpoint writes of every resharding run, and how soon
    the hang record's stalls were reported."""
    w = [s * 1e3 for r in reshard["rows"] for s in r["ckpt_write_s"]]
    return {"resharding.write": f"{min(w):.0f}-{max(w):.0f} ms",
            "hang.stall.median": f"{hang['faults']['stall']['detect_s_median']:.2f} s"}


def figures(ref_dir: Path) -> dict[str, str]:
    return {**reliability_figures(load(ref_dir, "resharding.json"), load(ref_dir, "hang.json")),
            **cluster_figures(load(ref_dir, "cluster.json")),
            **cluster_bytes_figures(load(ref_dir, "cluster.json")),
            **restart_figures(load(ref_dir, "reliability-restart.json")),
            **plan_figures(load(ref_dir, "plan-validate.json"),
                           load(ref_dir, "plan-calibration.json")),
            **gpu_plan_figures(load(ref_dir, "plan-search-1t.json")),
            **plan_goal_figures(load(ref_dir, "plan-validate.json")),
            **gpu_stall_figures(load(ref_dir, "plan-measured-h100.json")),
            **memory_figures(load(ref_dir, "memory.json"))}


def tables(ref_dir: Path) -> dict[str, str]:
    cluster = load(ref_dir, "cluster.json")
    return {"links": cluster_links_table(cluster), "strategies": cluster_strategies_table(cluster),
            "grid": cluster_3d_table(cluster), "hang": hang_table(load(ref_dir, "hang.json")),
            "doctor": doctor_cases(load(ref_dir, "doctor-collective.json")),
            "resharding": resharding_table(load(ref_dir, "resharding.json")),
            "gpumeasured": measured_table(measured := load(ref_dir, "plan-measured-h100.json")),
            "gpuconstants": constants_table(measured),
            "gpusearch": search_table(load(ref_dir, "plan-search-1t.json")),
            **memory_tables(load(ref_dir, "memory.json"))}
