"""Tables of run records, for the terminal (rich) and for markdown reports."""
from __future__ import annotations

from pathlib import Path


def console(width: int = 200):
    """A rich console that keeps wide tables whole: a terminal's own width, or ``width`` when
    the output goes to a log or a pipe (rich would squeeze tables into 80 columns there)."""
    from rich.console import Console
    c = Console()
    return c if c.is_terminal else Console(width=width)


def machine() -> dict:
    """The machine and software a record was made with (no heavy imports: versions from the
    installed distributions)."""
    import os
    import platform
    import socket
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    versions = {}
    for dist in ("torch", "deepspeed", "accelerate", "fairscale", "matplotlib", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": None if mem is None else round(mem, 1), "os": platform.platform(),
            "python": platform.python_version(), **versions}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _num(x: float | None) -> str:
    """A loss in a table; a record keeps a NaN or infinity as null."""
    return "nan" if x is None else f"{x:.3f}"


def _floats(xs) -> list[float]:
    return [float("nan") if x is None else x for x in xs]


COLUMNS = ("lab", "variant", "world", "steps", "loss first->last", "max rel dloss",
           "max abs dparam", "ok", "step ms", "tokens/s", "comm/step/rank", "peak mem/rank")


def verdict_word(s: dict) -> str:
    """The ok column: yes / NO, what failed, or why a run is not held to the baseline. A run
    that differs by design (a step skipped on purpose, Hogwild) reads as ok with the reason,
    so a newcomer does not take it for a failure; real failures read NO."""
    b = s["baseline"]
    if s.get("nonfinite"):
        return "NO (diverged)"
    if b.get("ok") is False:
        return "NO"
    if not s.get("ok", True):
        return "checks FAILED"
    if b.get("ok") is None:
        return f"ok ({b['note']})" if b.get("note") else "-"
    return "yes"


def row(s: dict) -> list[str]:
    b = s["baseline"]
    ok = verdict_word(s)
    peaks = [m["peak"] for m in s["memory"]["per_rank"]]
    return [s["lab"], s["variant"], str(s["world_size"]), str(s["steps"]),
            f"{_num(s['losses'][0])}->{_num(s['losses'][-1])}", _sci(b.get("max_rel_loss_diff")),
            _sci(b.get("max_abs_param_diff")), ok, f"{s['time']['step_s_median'] * 1e3:.1f}",
            f"{s['time']['tokens_per_s']:,.0f}", human_bytes(s["comm"]["bytes_per_step"]),
            human_bytes(max(peaks) if peaks else None)]


def print_table(summaries: list[dict], title: str | None = None) -> None:
    from rich.table import Table

    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("lab", "variant") else "right")
    for s in summaries:
        r = row(s)
        if r[7].startswith(("NO", "checks")):
            r[7] = f"[bold red]{r[7]}[/]"
        t.add_row(*r)
    console().print(t)


# --------------------------------------------------------------------------- the tour report

REPORT_COLUMNS = ("lab", "variant", "world", "max rel loss diff", "max abs param diff", "ok",
                  "step ms", "tokens/s", "comm/step/rank", "exposed comm", "peak mem/rank")


def run_label(s: dict) -> str:
    return f"{s['lab']} [{s['variant']}] x{s['world_size']}"


def profile_shares(s: dict) -> dict[str, float] | None:
    """Mean over ranks of each share of the profiled step (computation, communication, overlap,
    exposed_communication, other; dtlab profile), or None for a run not profiled."""
    rows = [r["share_of_step"] for r in (s.get("extra", {}).get("profile") or []) if r]
    if not rows:
        return None
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def exposed_share(s: dict) -> float | None:
    """Mean over ranks of the profiled step's exposed-communication share."""
    shares = profile_shares(s)
    return None if shares is None else shares["exposed_communication"]


def report_row(s: dict) -> list[str]:
    b = s["baseline"]
    ok = verdict_word(s)
    peaks = [m["peak"] for m in s["memory"]["per_rank"]]
    ex = exposed_share(s)
    return [s["lab"], s["variant"], str(s["world_size"]), _sci(b.get("max_rel_loss_diff")),
            _sci(b.get("max_abs_param_diff")), ok, f"{s['time']['step_s_median'] * 1e3:.1f}",
            f"{s['time']['tokens_per_s']:,.0f}", human_bytes(s["comm"]["bytes_per_step"]),
            "-" if ex is None else f"{ex:.0%}", human_bytes(max(peaks) if peaks else None)]


def plt_agg():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_plt = plt_agg


def fill_marked_tables(docs: Path, pages, tag: str, blocks: dict[str, str]) -> list[str]:
    """Write every ``blocks[name]`` between ``<!-- TAG:name -->`` and ``<!-- /TAG:name -->`` in
    the pages under ``docs``; returns the pages that changed. How recorded figures reach the
    docs (``python -m dtlab.docsgen.records.long_sequences``, ``schedexp``) without hand copying."""
    import re

    from dtlab.measure.run_record import atomic_write_text
    changed = []
    for page in pages:
        path = Path(docs) / page
        text = new = path.read_text()
        for name, body in blocks.items():
            new = re.sub(rf"<!-- {tag}:{name} -->\n.*?<!-- /{tag}:{name} -->",
                         lambda _m: f"<!-- {tag}:{name} -->\n{body}\n<!-- /{tag}:{name} -->",
                         new, flags=re.S)
        if new != text:
            atomic_write_text(path, new)
            changed.append(page)
    return changed


def record_tool_parser(prog: str, description: str):
    """The flags every record tool shares (``python -m dtlab.docsgen.records.schedule_runs``, ``commexp``):
    where the record goes, the pictures, the docs to write, and redrawing from a record."""
    import argparse
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--json", required=True, help="where to write the record")
    p.add_argument("--img", default=None, help="folder for the pictures")
    p.add_argument("--docs", default=None, help="docs folder whose tables to write")
    p.add_argument("--redraw", action="store_true",
                   help="only write the tables again from --json")
    return p


LINES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "x")


def series_style(i: int) -> dict:
    """The i-th series' colour, line style and marker: no two of the first 240 alike, so a
    picture with 20 runs does not draw two in the same pink."""
    import matplotlib
    colours = matplotlib.colormaps["tab10"].colors
    return {"color": colours[i % 10], "ls": LINES[(i // 10) % 4],
            "marker": MARKERS[(i // 40) % 6], "markersize": 3}


def plot_losses(summaries: list[dict], path: Path) -> Path:
    """Every strategy's loss curve over its baseline's, and each one's distance from it."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 8.5))
    refs = {}
    for i, s in enumerate(summaries):
        losses = _floats(s["losses"])
        a.plot(losses, lw=1.2, label=run_label(s), **series_style(i))
        base = s["baseline"].get("losses")
        if base:
            refs[(s["preset"], s["batch_size"])] = base
            d = [max(abs(x - y) / max(abs(y), 1e-12), 1e-9) for x, y in zip(losses, _floats(base))]
            b.semilogy(d, lw=1.2, label=run_label(s), **series_style(i))
    for k, ((preset, batch), base) in enumerate(refs.items()):
        a.plot(base, color="black", ls=("--", "-.", ":")[k % 3], lw=2.2,
               label=f"baseline, 1 process ({preset}, batch {batch})")
    a.set(xlabel="step", ylabel="loss of the global batch", title="loss: every strategy")
    b.set(xlabel="step", ylabel="|loss - baseline| / baseline (floor 1e-9)",
          title="distance from the baseline (red: fp32 bound 1e-5)")
    b.axhline(1e-5, color="red", lw=1, ls=":")
    for ax in (a, b):  # below the axes, so no legend hides a curve
        ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


STATES = ("params", "grads", "optimizer")


def plot_memory(summaries: list[dict], path: Path) -> Path:
    """Rank 0's model states by category (stacked, ZeRO's formula as a black bar) and its peak
    saved activations, for each strategy: one row of axes a preset, so a bigger model's bars
    do not flatten the small one's."""
    plt = _plt()
    runs = [s for s in summaries if s["memory"]["per_rank"]]
    presets = list(dict.fromkeys(s["preset"] for s in runs))
    widest = max(sum(s["preset"] == p for s in runs) for p in presets)
    fig, axes = plt.subplots(len(presets), 2, squeeze=False,
                             figsize=(max(12, 0.9 * widest + 4), 5.5 * len(presets)),
                             gridspec_kw={"width_ratios": [3, 2]})
    for (a, b), preset in zip(axes, presets):
        group = [s for s in runs if s["preset"] == preset]
        x = range(len(group))
        bottoms = [0.0] * len(group)
        for cat in STATES:
            vals = [s["memory"]["per_rank"][0].get(cat, 0) / 2**10 for s in group]
            a.bar(x, vals, bottom=bottoms, label=cat)
            bottoms = [u + v for u, v in zip(bottoms, vals)]
        shown = False
        for i, s in enumerate(group):
            f = s.get("extra", {}).get("memory_formula")
            if f and "device" in f:
                total = sum(f["device"].get(k, 0) for k in STATES)
                a.plot([i - 0.4, i + 0.4], [total / 2**10] * 2, "k-", lw=2.5,
                       label=None if shown else "ZeRO formula")
                shown = True
        b.bar(x, [s["memory"]["per_rank"][0].get("activations_peak", 0) / 2**10
                  for s in group], color="tab:red")
        labels = [run_label(s) for s in group]
        for ax, title in ((a, f"{preset} preset: model states on rank 0 (params + grads + "
                              f"optimizer)"),
                          (b, f"{preset} preset: peak saved activations on rank 0")):
            ax.set_xticks(list(x), labels, rotation=70, ha="right", fontsize=7)
            ax.set(ylabel="KiB", title=title)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comm(summaries: list[dict], path: Path) -> Path:
    plt = _plt()
    runs = [s for s in summaries if s["world_size"] > 1]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(runs) + 3), 4.5))
    kib = [s["comm"]["bytes_per_step"] / 2**10 for s in runs]
    bars = ax.bar(range(len(runs)), kib, color="tab:purple")
    ax.bar_label(bars, [f"{v:,.0f}" for v in kib], fontsize=7)
    ax.set_yscale("log")  # 64 KiB (a pipeline cut) to MiB (3D on a bigger preset) in one view
    ax.set_xticks(range(len(runs)), [run_label(s) for s in runs], rotation=60, ha="right",
                  fontsize=7)
    ax.set(ylabel="KiB sent per step by rank 0", title="communication per step (counted at the "
           "collectives)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, summaries: list[dict], skipped: list[tuple[str, str]],
                 failed: list[tuple[str, str]], wall_s: float, runs: dict[str, Path]) -> Path:
    """report.md, the PNGs beside it, and report.html with the PNGs inside (no server needed)."""
    import base64
    import html
    import shutil

    from dtlab.measure.run_record import atomic_write_text
    out = Path(out)
    pics = [("Loss curves over the baseline's", plot_losses(summaries, out / "loss.png")),
            ("Memory per rank by category", plot_memory(summaries, out / "memory.png")),
            ("Communication per step", plot_comm(summaries, out / "comm.png"))]
    for s in summaries:
        src = runs.get(run_label(s), Path("-")) / "schedule.png"
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
    md.append("| " + " | ".join(REPORT_COLUMNS) + " |\n|" + "---|" * len(REPORT_COLUMNS) + "\n")
    md += ["| " + " | ".join(report_row(s)) + " |\n" for s in summaries]
    md += ["\n"] + [f"- skipped {n}: {why}\n" for n, why in skipped]
    md += [f"- FAILED {n}: {why}\n" for n, why in failed]
    for title, p in pics:
        md.append(f"\n## {title}\n\n![{title}]({p.name})\n")
    atomic_write_text(out / "report.md", "".join(md))
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in report_row(s)) + "</tr>\n"
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
<table><tr>{''.join(f'<th>{e(c)}</th>' for c in REPORT_COLUMNS)}</tr>
{rows}</table><ul>{notes}</ul>
{imgs}</body></html>
"""
    atomic_write_text(out / "report.html", page)
    return out / "report.md"
