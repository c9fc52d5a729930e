"""``dtlab tour``: every lab and variant this machine can run, each against the baseline and
profiled; a running table, then report.md / report.html and the pictures in ``--out``.

Three steps: :func:`plan` (which runs, which are skipped and why, every request validated before
anything starts), :func:`run` (one torchrun per run, a progress bar and a row as each ends) and
``write_report`` (the tables and pictures).
"""
from __future__ import annotations

import base64
import html
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dtlab import registry
from dtlab.errors import UsageError
from dtlab.measure.run_record import atomic_write_text, read_summary
from dtlab.report import pictures, tables
from dtlab.report.records import machine
from dtlab.launch.launcher import launch, validate

ROW_WIDTHS = (22, 22, 5, 17, 18, 6, 8, 9, 14, 12, 13)  # tables.REPORT_COLUMNS on the terminal


@dataclass
class TourRun:
    lab: registry.Lab
    nproc: int
    variant: tuple[str, ...]
    out: Path
    lab_args: list[str]

    @property
    def title(self) -> str:
        return f"{self.lab.name} {' '.join(self.variant)}".strip()


def _names(text: str | None, flag: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for n in names:
        if n not in registry.LABS:
            raise UsageError(f"{flag}: unknown lab {n!r}; labs: {', '.join(registry.LABS)}")
    return names


def _cuda() -> bool:
    return torch.cuda.is_available()


def plan(only: str | None, skip: str | None, nproc: int | None, steps: int,
         out: Path) -> tuple[list[TourRun], list[tuple[str, str]]]:
    """The runs of the tour and the (name, reason) of every variant that cannot run here."""
    if steps < 3:
        raise UsageError(f"--steps must be >= 3 for the tour (each run is profiled), got {steps}")
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    names = _names(only, "--only") or list(registry.LABS)
    leave_out = set(_names(skip, "--skip"))
    runs, skipped = [], []
    for name in (n for n in names if n not in leave_out):
        lab = registry.LABS[name]
        if lab.missing():
            skipped.append((name, f"needs {', '.join(lab.missing())} (extra '{lab.extra}')"))
            continue
        if lab.gpu_only and not _cuda():
            skipped.append((name, f"needs CUDA: {lab.gpu_only}"))
            continue
        n = lab.tour_nproc if lab.max_world == lab.min_world else (nproc or lab.tour_nproc)
        variants = [lab.tour_args, *lab.tour_more]
        for gpu_args, why in lab.tour_gpu:
            if _cuda():
                variants.append(gpu_args)
            else:
                skipped.append((f"{name} {' '.join(gpu_args)}", f"needs CUDA: {why}"))
        for k, variant in enumerate(variants):
            run_out = out / (f"{name}-n{n}" + (f"-{k}" if k else ""))
            lab_args = ["--steps", str(steps), "--out", str(run_out),
                        "--profile-dir", str(run_out / "profile"), *variant]
            validate(lab, n, lab_args)
            runs.append(TourRun(lab, n, tuple(variant), run_out, lab_args))
    return runs, skipped


def run(runs: list[TourRun], skipped: list[tuple[str, str]], out: Path,
        json_path: str | None = None) -> int:
    """Launch every run, show each row as it ends, write the report and the record
    (OUT/tour.json, and ``json_path`` when given); 1 if any run failed."""
    console = tables.console()
    summaries, failed, dirs = [], [], {}
    t0 = time.perf_counter()
    console.print("  ".join(f"{c:>{w}}" for c, w in zip(tables.REPORT_COLUMNS, ROW_WIDTHS)))
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("tour", total=len(runs))
        for r in runs:
            progress.update(task, description=f"{r.title} x{r.nproc}")
            (r.out / "summary.json").unlink(missing_ok=True)
            rc = launch(r.lab, r.nproc, r.lab_args, log=r.out / "run.log")
            log = r.out / "run.log"
            if (r.out / "summary.json").is_file():
                s = read_summary(r.out)
                summaries.append(s)
                dirs[tables.run_label(s)] = r.out
                pictures.draw_run_pictures(r.out)  # drawn from the record the lab wrote
                style = "" if s["ok"] else "[bold red]"
                progress.console.print(style + "  ".join(
                    f"{c:>{w}}" for c, w in zip(tables.report_row(s), ROW_WIDTHS)),
                    markup=bool(style))
                if not s["ok"]:
                    failed.append((r.lab.name, f"{' '.join(r.variant)}: outside tolerance or "
                                               f"failed checks; log {log}"))
            else:
                failed.append((r.lab.name, f"{' '.join(r.variant)}: exit {rc}, no record; "
                                           f"log {log}"))
                progress.console.print(f"[bold red]  {r.title} FAILED (exit {rc}); log: {log}")
            progress.advance(task)
    wall = time.perf_counter() - t0
    tables.print_table(summaries, title="dtlab tour: every lab against the single-process "
                                        "baseline")
    for name, why in skipped:
        console.print(f"  skipped {name}: {why}")
    md = write_report(out, summaries, skipped, failed, wall, dirs)
    record = json.dumps({"what": "dtlab tour: every lab against the single-process baseline",
                         "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                         "wall_s": wall, "runs": summaries, "skipped": skipped,
                         "failed": failed}, indent=1) + "\n"
    for path in [out / "tour.json"] + ([Path(json_path)] if json_path else []):
        atomic_write_text(path, record)
    console.print(f"{len(summaries)} runs in {wall:.0f} s; report: {md} and "
                  f"{out / 'report.html'} (opens without a server)")
    return 1 if failed else 0


def tour(only: str | None, skip: str | None, nproc: int | None, steps: int, out: str,
         json_path: str | None = None) -> int:
    runs, skipped = plan(only, skip, nproc, steps, Path(out))
    return run(runs, skipped, Path(out), json_path)


def write_report(out: Path, summaries: list[dict], skipped: list[tuple[str, str]],
                 failed: list[tuple[str, str]], wall_s: float, runs: dict[str, Path]) -> Path:
    """report.md, the PNGs beside it, and report.html with the PNGs inside (no server needed)."""
    out = Path(out)
    pics = [("Loss curves over the baseline's", pictures.plot_losses(summaries, out / "loss.png")),
            ("Memory per rank by category", pictures.plot_memory(summaries, out / "memory.png")),
            ("Communication per step", pictures.plot_comm(summaries, out / "comm.png"))]
    for s in summaries:
        src = runs.get(tables.run_label(s), Path("-")) / "schedule.png"
        if s["lab"] == "pipeline" and src.is_file():
            dst = out / f"schedule-{s['variant']}.png"
            shutil.copyfile(src, dst)
            pics.append((f"Pipeline schedule: {s['variant']}", dst))
    n_bad = len(failed)  # runs outside tolerance or failing checks, and runs with no record
    head = (f"{len(summaries)} runs in {wall_s:.0f} s; "
            + ("all within tolerance" if n_bad == 0 else f"{n_bad} NOT OK"))
    md = ["# dtlab tour\n\n", head + ".\n\n",
          "Each run trained the same model on the same data as the single-process baseline; "
          "`max rel loss diff` and `max abs param diff` are its distance from it (fp32 bound "
          "1e-5 / 1e-4; mixed precision states its own). `exposed comm` is the share of a "
          "profiled step spent in communication that no computation overlapped "
          "(docs/profiling.md).\n\n"]
    md.append("| " + " | ".join(tables.REPORT_COLUMNS) + " |\n|" + "---|" * len(tables.REPORT_COLUMNS) + "\n")
    md += ["| " + " | ".join(tables.report_row(s)) + " |\n" for s in summaries]
    md += ["\n"] + [f"- skipped {n}: {why}\n" for n, why in skipped]
    md += [f"- FAILED {n}: {why}\n" for n, why in failed]
    for title, p in pics:
        md.append(f"\n## {title}\n\n![{title}]({p.name})\n")
    atomic_write_text(out / "report.md", "".join(md))
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in tables.report_row(s)) + "</tr>\n"
                   for s in summaries)
    imgs = "".join(f"<h2>{e(t)}</h2><img alt='{e(t)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'>\n" for t, p in pics)
    notes = "".join(f"<li>skipped {e(n)}: {e(w)}</li>" for n, w in skipped) + \
        "".join(f"<li><b>FAILED</b> {e(n)}: {e(w)}</li>" for n, w in failed)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dtlab tour</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:2px 8px;text-align:right}} td:nth-child(-n+2){{text-align:left}}
img{{max-width:100%;border:1px solid #ddd}}</style></head><body>
<h1>dtlab tour</h1><p>{e(head)}.</p>
<table><tr>{''.join(f'<th>{e(c)}</th>' for c in tables.REPORT_COLUMNS)}</tr>
{rows}</table><ul>{notes}</ul>
{imgs}</body></html>
"""
    atomic_write_text(out / "report.html", page)
    return out / "report.md"
