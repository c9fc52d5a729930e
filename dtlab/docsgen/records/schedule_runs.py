"""Record the pipeline schedules after 1F1B and expert parallelism; draw and tabulate them.

    python -m dtlab.docsgen.records.schedule_runs --json docs/reference/schedules-experts.json \\
        --img docs/img --docs docs

Runs the real labs (one torchrun each):
- the pipeline lab with ``--stage-compute-ms 20`` (a known busy time per action, so the
  schedule's shape dominates this small CPU): 1F1B beside interleaved 1F1B (2 ranks x 2 chunks
  of the small preset) and beside ZB-H1 (4 ranks), measured bubble against the formula and the
  live micro-batches against the action lists;
- expert parallelism, 4 experts top-2, at EP 2 and EP 2 x DP 2: tokens per expert, all-to-all
  bytes, and a capacity-factor run that drops assignments.
Copies the runs' schedule.png and experts.png (drawn from their records after each run) into
``--img`` and writes the tables between
``<!-- schedexp:NAME -->`` markers in docs/pipeline.md and docs/expert-parallel.md.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dtlab.launch import sessions
from dtlab.measure.run_record import atomic_write_text
from dtlab.report import pipeline_schedule, records

PIPELINES = [  # (schedule, ranks, micro-batches)
    ("1f1b", 2, 4), ("interleaved", 2, 4), ("1f1b", 2, 8), ("interleaved", 2, 8),
    ("1f1b", 4, 8), ("zbh1", 4, 8), ("1f1b", 4, 16), ("zbh1", 4, 16)]
EXPERTS = [(2, ()), (4, ("--ep", "2", "--dp", "2")), (2, ("--capacity-factor", "1.0"))]
MOE = ("--moe-experts", "4", "--moe-top-k", "2")


def lab_run(lab: str, nproc: int, *args: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"dtlab-schedexp-{lab}-")
    cmd = [sys.executable, "-m", "dtlab", "run", lab, "--nproc", str(nproc), "--out", out, *args]
    p = sessions.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"dtlab run {lab} {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    s = json.loads((Path(out) / "summary.json").read_text())
    s["command"] = " ".join(["dtlab", "run", lab, "--nproc", str(nproc), *args])
    s["out"] = out
    return s


def pipeline_rows() -> list[dict]:
    rows = []
    for schedule, p, m in PIPELINES:
        s = lab_run("pipeline", p, "--schedule", schedule, "--microbatches", str(m), "--preset",
                    "small", "--steps", "3", "--stage-compute-ms", "20")
        e = {**s["extra"], **pipeline_schedule.figures(s["extra"])}  # read from its timelines
        rows.append({"schedule": schedule, "P": p, "M": m, "V": e.get("virtual_stages", 1),
                     "bubble_measured": e["bubble_measured"], "bubble_theory": e["bubble_theory"],
                     "peak_live": e["peak_live_microbatches"],
                     "peak_live_theory": e["peak_live_theory"],
                     "activation_bytes": e["peak_live_activation_bytes"],
                     "baseline_ok": s["baseline"]["ok"], "command": s["command"],
                     "picture": str(Path(s["out"]) / "schedule.png")})
        print(f"{schedule:12s} P={p} M={m:2d}: bubble {e['bubble_measured']:.3f} (theory "
              f"{e['bubble_theory']:.3f}), live {e['peak_live_microbatches']}", flush=True)
    return rows


def expert_rows() -> list[dict]:
    rows = []
    for nproc, extra in EXPERTS:
        s = lab_run("expert_parallel", nproc, *MOE, "--steps", "10", *extra)
        e = s["extra"]
        last = e["tokens_per_expert"][-1]
        rows.append({"nproc": nproc, "ep": e["ep"], "dp": e["dp"],
                     "capacity_factor": e["capacity_factor"],
                     "dropped": e["dropped_assignments"], "baseline": s["baseline"],
                     "tokens_last_step": last,
                     "all_to_all_bytes_rank0_per_step": s["comm"]["by_op"]["all_to_all"][
                         "sent_bytes"] / 10,
                     "step_s": s["time"]["step_s_median"], "command": s["command"],
                     "picture": str(Path(s["out"]) / "experts.png")})
        print(f"experts ep{e['ep']} dp{e['dp']} cf {e['capacity_factor']}: dropped "
              f"{e['dropped_assignments']}, last step {last}", flush=True)
    return rows


def tables(R: dict) -> dict[str, str]:
    src = (f"record `docs/reference/schedules-experts.json` (`python -m dtlab.docsgen.records.schedule_runs`, "
           f"{R['date']}, {R['machine']['cores']} CPU cores, torch {R['machine']['torch']})")
    t = ["| schedule | P | V | M | theory | measured | live micro-batches per rank | theory |",
         "|---|---|---|---|---|---|---|---|"]
    for r in R["pipelines"]:
        t.append(f"| {r['schedule']} | {r['P']} | {r['V']} | {r['M']} | "
                 f"{r['bubble_theory']:.3f} | {r['bubble_measured']:.3f} | {r['peak_live']} | "
                 f"{r['peak_live_theory']} |")
    worst = max(abs(r["bubble_measured"] - r["bubble_theory"]) for r in R["pipelines"])
    out = {"schedules": "\n".join(t) + (
        f"\n\nSmall preset, `--stage-compute-ms 20`, 3 steps (the first left out), every run "
        f"equal to the baseline; {src}. Largest difference from the formula: {worst:.3f}. "
        "Interleaved live micro-batches count chunk-micro-batches (each half a stage's "
        "activations at V = 2).")}
    t = ["| ranks | EP x DP | capacity factor | tokens per expert, last step (block 0; block 1) | "
         "dropped | baseline | all-to-all bytes a step, rank 0 |", "|---|---|---|---|---|---|---|"]
    for r in R["experts"]:
        b = r["baseline"]
        verdict = (f"equal (rel loss {b['max_rel_loss_diff']:.1e})" if b["ok"]
                   else "not compared: " + b.get("note", ""))
        t.append(f"| {r['nproc']} | {r['ep']} x {r['dp']} | {r['capacity_factor'] or '-'} | "
                 f"{[int(x) for x in r['tokens_last_step'][0]]}; "
                 f"{[int(x) for x in r['tokens_last_step'][1]]} | {r['dropped']} | {verdict} | "
                 f"{r['all_to_all_bytes_rank0_per_step']:,.0f} |")
    out["experts"] = "\n".join(t) + (
        f"\n\nTiny preset, 4 experts, top-2, 10 steps; {src}.")
    return out


PAGES = ("pipeline.md", "expert-parallel.md")


def render_docs(R: dict, docs: Path) -> list[str]:
    return records.fill_marked_tables(docs, PAGES, "schedexp", tables(R))


def make_parser():
    return records.record_tool_parser("python -m dtlab.docsgen.records.schedule_runs", __doc__.splitlines()[0])


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    if a.redraw:
        R = json.loads(Path(a.json).read_text())
    else:
        R = {"what": "pipeline schedules after 1F1B and expert parallelism "
                     "(python -m dtlab.docsgen.records.schedule_runs)", "date": time.strftime("%Y-%m-%d"),
             "machine": records.machine()}
        R["pipelines"] = pipeline_rows()
        R["experts"] = expert_rows()
        atomic_write_text(Path(a.json), json.dumps(R, indent=1) + "\n")
        print(f"wrote {a.json}")
        if a.img:
            img = Path(a.img)
            img.mkdir(parents=True, exist_ok=True)
            for r in R["pipelines"]:
                if (r["schedule"], r["M"]) in (("interleaved", 8), ("zbh1", 8)):
                    name = f"pipeline-{r['schedule']}-p{r['P']}-m{r['M']}.png"
                    shutil.copyfile(r["picture"], img / name)
            shutil.copyfile(R["experts"][0]["picture"], img / "experts-ep2.png")
    if a.docs:
        print(f"tables written in: {', '.join(render_docs(R, Path(a.docs))) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
