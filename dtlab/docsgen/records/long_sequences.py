"""Measure what long sequences cost and what each technique saves; record it and draw it.

    python -m dtlab.docsgen.records.long_sequences --json docs/reference/long-sequences.json --img docs/img \
        --docs docs

Runs the real labs (``dtlab run ...``, one torchrun each, ``--no-baseline``: the equivalence is
the tests' job) over sequence lengths and records, per run, the activation bytes every rank
saved (the memory meter) beside the formula (``activation_formula`` in dtlab/costmodel/activations.py):
- recomputation none / selective / full on one process (``baseline`` lab), and the step time of
  each against the theory (a backward costs about two forwards, so recomputing every block adds
  one forward of the blocks: about 4/3 of the step);
- tensor parallelism with and without sequence parallelism at TP 2;
- context parallelism (ring attention) at W = 1, 2, 4, and each rank's attention work under the
  contiguous and the zig-zag layout.
Pictures: activation-recomputation.png, sequence-parallel.png, context-parallel.png (the labs'
measurements) and ring-attention-{contiguous,zigzag}.png (the ring's steps in each layout, the
``ring.png`` dtlab/report/ring_picture.py draws in the run folder from the blocks it recorded).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from dtlab.launch import sessions
from dtlab.measure.run_record import atomic_write_text
from dtlab.errors import UsageError
from dtlab.costmodel.activations import activation_formula_for
from dtlab.train.model import config_from_preset
from dtlab.plotting import plt_agg
from dtlab.report import records

PRESET, ROWS = "long", 8          # batch 8 sequences (the preset's)
SEQS = (64, 128, 256, 512)
VOCAB = 13


def lab_run(lab: str, nproc: int, *args: str, steps: int = 2) -> dict:
    """One lab run; its summary."""
    out = tempfile.mkdtemp(prefix=f"dtlab-longseq-{lab}-")
    cmd = [sys.executable, "-m", "dtlab", "run", lab, "--nproc", str(nproc), "--preset", PRESET,
           "--steps", str(steps), "--no-baseline", "--out", out, *args]
    p = sessions.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{p.stderr[-2000:]}")
    s = json.loads((Path(out) / "summary.json").read_text())
    s["command"] = " ".join(["dtlab", "run", lab, "--nproc", str(nproc), "--preset", PRESET,
                             "--steps", str(steps), *args])
    s["out"] = out
    return s


def _cfg(seq: int, **kw):
    return replace(config_from_preset(PRESET, VOCAB), seq_len=seq, **kw)


def recompute_rows(seqs) -> list[dict]:
    rows = []
    for seq in seqs:
        for mode in ("none", "selective", "full"):
            s = lab_run("baseline", 1, "--seq-len", str(seq), "--recompute", mode)
            m, f = s["memory"]["per_rank"][0], activation_formula_for(_cfg(seq, recompute=mode),
                                                                     ROWS)
            rows.append({"seq": seq, "recompute": mode, "measured": m["activations_peak"],
                         "formula": f["forward"], "recompute_peak": m["recompute_peak"],
                         "recompute_peak_formula": f["recompute_peak"],
                         "command": s["command"]})
            print(f"recompute {mode:9s} seq {seq:4d}: {m['activations_peak']:>11,} B "
                  f"(formula {f['forward']:,})", flush=True)
    return rows


def step_time_rows(seq: int, steps: int, rounds: int = 3) -> list[dict]:
    """Step time with each recompute mode: the modes in turn, ``rounds`` times (so a change of
    load on the machine hits all of them), the median of each mode's per-run medians."""
    modes = ("none", "selective", "full")
    medians = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            s = lab_run("baseline", 1, "--seq-len", str(seq), "--recompute", mode, steps=steps)
            medians[mode].append(s["time"]["step_s_median"])
    rows = [{"seq": seq, "recompute": mode, "step_s_median": statistics.median(medians[mode]),
             "runs_s": medians[mode],
             "command": s["command"].replace("--recompute full", f"--recompute {mode}")}
            for mode in modes]
    base = rows[0]["step_s_median"]
    n_layer = _cfg(seq).n_layer
    for r in rows:
        n_re = activation_formula_for(_cfg(seq, recompute=r["recompute"]), ROWS)[
            "recomputed_blocks"]
        r["ratio"] = r["step_s_median"] / base
        r["ratio_theory"] = 1 + n_re / n_layer / 3  # one more forward of those blocks, F = 1/3
        print(f"step time {r['recompute']:9s}: {r['step_s_median'] * 1e3:.1f} ms, x{r['ratio']:.3f}"
              f" (theory x{r['ratio_theory']:.3f})", flush=True)
    return rows


def sp_rows(seqs, tp: int = 2) -> list[dict]:
    rows = []
    for seq in seqs:
        for sp in (False, True):
            s = lab_run("tensor_parallel", tp, "--seq-len", str(seq), *(["--sp"] if sp else []))
            m = s["memory"]["per_rank"][0]
            f = activation_formula_for(_cfg(seq), ROWS, tp=tp, sp=sp)
            rows.append({"seq": seq, "tp": tp, "sp": sp, "measured": m["activations_peak"],
                         "formula": f["forward"], "block": f["block"],
                         "comm_bytes_per_step": s["comm"]["bytes_per_step"],
                         "by_op": s["comm"]["by_op"], "command": s["command"]})
            print(f"tp {tp}{' + sp' if sp else '     '} seq {seq:4d}: {m['activations_peak']:>11,}"
                  f" B (formula {f['forward']:,})", flush=True)
    return rows


def cp_rows(seqs, ring_pictures: dict, worlds=(2, 4)) -> list[dict]:
    rows = []
    for seq in seqs:
        for w in worlds:
            both = w == 4 and seq in (256, SEQS[0])
            for layout in ("zigzag", "contiguous") if both else ("zigzag",):
                s = lab_run("context_parallel", w, "--seq-len", str(seq), "--layout", layout)
                per = s["memory"]["per_rank"]
                f = activation_formula_for(_cfg(seq), ROWS, cp=w)
                work = [m["attention_entries"] for m in per]
                rows.append({"seq": seq, "cp": w, "layout": layout,
                             "measured": per[0]["activations_peak"], "formula": f["forward"],
                             "attention_entries": work,
                             "imbalance": max(work) / (sum(work) / len(work)),
                             "send_bytes_per_step": s["comm"]["by_op"]["send"]["bytes"] / 2,
                             "send_bytes_theory": s["extra"]["send_bytes_theory"],
                             "command": s["command"]})
                if w == 4 and seq == SEQS[0]:
                    ring_pictures[layout] = Path(s["out"]) / "ring.png"
                print(f"cp {w} {layout:10s} seq {seq:4d}: {per[0]['activations_peak']:>11,} B "
                      f"(formula {f['forward']:,}), work {work}", flush=True)
    return rows


# --------------------------------------------------------------------------- pictures

def _seq_axis(ax) -> None:
    """Log axes ticked at the measured lengths only (no minor labels)."""
    from matplotlib.ticker import NullFormatter  # matplotlib: only to draw
    ax.set_xticks(SEQS, [str(s) for s in SEQS])
    ax.xaxis.set_minor_formatter(NullFormatter())

def _mib(x):
    return x / 2**20


def _series(ax, pts: list[dict], color: str, name: str) -> None:
    """Measured points and, under them, the formula's line, per sequence length."""
    seqs = [r["seq"] for r in pts]
    ax.plot(seqs, [_mib(r["formula"]) for r in pts], "-", color=color, alpha=0.5)
    ax.plot(seqs, [_mib(r["measured"]) for r in pts], "o", color=color,
            label=f"{name} (measured; line: formula)")


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel=ylabel,
           title=title)
    _seq_axis(ax)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt_agg().close(fig)


def draw_recompute(rows, path: Path) -> None:
    fig, ax = plt_agg().subplots(figsize=(6.4, 4.2))
    for mode, color in (("none", "tab:red"), ("selective", "tab:orange"), ("full", "tab:green")):
        _series(ax, [r for r in rows if r["recompute"] == mode], color, mode)
    _finish(ax, "activations saved in the forward (MiB)",
            f"Recomputation, preset {PRESET}, {ROWS} sequences, one process")
    _save(fig, path)


def draw_sp(rows, path: Path) -> None:
    fig, ax = plt_agg().subplots(figsize=(6.4, 4.2))
    for sp, color in ((False, "tab:blue"), (True, "tab:purple")):
        _series(ax, [r for r in rows if r["sp"] == sp], color, "TP 2 + SP" if sp else "TP 2")
    _finish(ax, "activations per rank (MiB)",
            f"Tensor parallel with and without SP, preset {PRESET}")
    _save(fig, path)


def draw_cp(rows, base_rows, path: Path) -> None:
    fig, (ax, bx) = plt_agg().subplots(1, 2, figsize=(11, 4.2))
    one = [r for r in base_rows if r["recompute"] == "none"]
    series = [(1, one, "tab:red")] + [
        (w, [r for r in rows if r["cp"] == w and r["layout"] == "zigzag"], c)
        for w, c in ((2, "tab:blue"), (4, "tab:green"))]
    for w, pts, color in series:
        _series(ax, pts, color, f"CP {w}")
    _finish(ax, "activations per rank (MiB)", f"Context parallel, preset {PRESET}")
    four = {r["layout"]: r for r in rows if r["cp"] == 4 and r["seq"] == 256}
    width = 0.38
    for i, (layout, color) in enumerate((("contiguous", "tab:gray"), ("zigzag", "tab:green"))):
        if layout not in four:
            continue
        work = four[layout]["attention_entries"]
        bx.bar([r + (i - 0.5) * width for r in range(len(work))], work, width, color=color,
               label=f"{layout} (max/mean {four[layout]['imbalance']:.2f})")
    bx.set(xlabel="rank", ylabel="attention scores computed per layer, per row and head",
           title="Causal work per rank, CP 4, seq 256")
    bx.set_xticks(range(4))
    bx.legend(fontsize=8)
    _save(fig, path)


# --------------------------------------------------------------------------- the docs' tables

def _m(x) -> str:
    return f"{x / 2**20:.2f}"


def tables(R: dict) -> dict[str, str]:
    """The measured tables of the three pages, from the record (marker name -> markdown)."""
    src = (f"record `docs/reference/long-sequences.json` (`python -m dtlab.docsgen.records.long_sequences`, "
           f"{R['date']}, {R['machine']['cores']} CPU cores, torch {R['machine']['torch']})")
    rows, out = R["recompute"], {}
    seqs = sorted({r["seq"] for r in rows})
    t = ["| seq | none (MiB) | selective (MiB) | full (MiB) | full / none | formula |",
         "|---|---|---|---|---|---|"]
    for seq in seqs:
        by = {r["recompute"]: r for r in rows if r["seq"] == seq}
        same = all(r["measured"] == r["formula"] for r in by.values())
        t.append(f"| {seq} | {_m(by['none']['measured'])} | {_m(by['selective']['measured'])} | "
                 f"{_m(by['full']['measured'])} | "
                 f"{by['full']['measured'] / by['none']['measured']:.3f} | "
                 f"{'equal, to the byte' if same else 'DIFFERS'} |")
    full = [r for r in rows if r["recompute"] == "full" and r["seq"] == seqs[-1]][0]
    none = [r for r in rows if r["recompute"] == "none" and r["seq"] == seqs[-1]][0]
    out["recompute"] = "\n".join(t) + (
        f"\n\nPreset `{R['preset']}` (4 blocks, width 64, 4 heads), {R['rows_per_rank']} "
        f"sequences, one process: the activations saved in the forward as the meter counted "
        f"them; {src}. Commands: `{rows[0]['command']}`, and the same with `--recompute "
        f"selective|full`. While a block is recomputed it saves its set again beyond the kept "
        f"input: {_m(full['recompute_peak'])} MiB at seq {full['seq']} (formula "
        f"{_m(full['recompute_peak_formula'])}), so full recomputation peaks at "
        f"{_m(full['measured'] + full['recompute_peak'])} MiB against {_m(none['measured'])} "
        "MiB without it.")
    t = ["| recompute | step (ms, median) | ratio to none | theory |", "|---|---|---|---|"]
    for r in R["recompute_step_time"]:
        t.append(f"| {r['recompute']} | {r['step_s_median'] * 1e3:.1f} | {r['ratio']:.3f} | "
                 f"{r['ratio_theory']:.3f} |")
    out["time"] = "\n".join(t) + (
        f"\n\nSeq {R['recompute_step_time'][0]['seq']}, preset `{R['preset']}`, one process, "
        f"median of {R.get('time_steps', 12)} steps a run"
        + (f", the median of {len(R['recompute_step_time'][0]['runs_s'])} runs a mode taken in "
           "turn" if "runs_s" in R["recompute_step_time"][0] else "")
        + f"; {src}. Theory: 1 + (recomputed blocks / blocks) / 3, the blocks' forward taken as "
        "a third of the step (selective recomputes 2 of the 4 blocks). Medians on a 2-core CPU, "
        "where the step also holds the optimizer and the loss: a measurement, not a benchmark.")
    sp = R["sequence_parallel"]
    t = ["| seq | TP 2 (MiB) | TP 2 + SP (MiB) | SP / TP | LayerNorm inputs a block, TP -> SP "
         "(KiB) | formula |", "|---|---|---|---|---|---|"]
    for seq in seqs:
        a = next(r for r in sp if r["seq"] == seq and not r["sp"])
        b = next(r for r in sp if r["seq"] == seq and r["sp"])
        same = a["measured"] == a["formula"] and b["measured"] == b["formula"]
        t.append(f"| {seq} | {_m(a['measured'])} | {_m(b['measured'])} | "
                 f"{b['measured'] / a['measured']:.3f} | "
                 f"{a['block']['layernorm_inputs'] / 1024:.0f} -> "
                 f"{b['block']['layernorm_inputs'] / 1024:.0f} | "
                 f"{'equal' if same else 'DIFFERS'} |")
    a = next(r for r in sp if r["seq"] == 256 and not r["sp"])
    b = next(r for r in sp if r["seq"] == 256 and r["sp"])
    out["sp"] = "\n".join(t) + (
        f"\n\nRank 0's activations, preset `{R['preset']}`, {R['rows_per_rank']} sequences, "
        f"TP 2; {src}. The LayerNorm inputs and statistics halve; the gathered LayerNorm "
        "outputs, q, k, v and the MLP's hidden layer are what TP already had, so the whole falls "
        f"by {100 * (1 - b['measured'] / a['measured']):.0f}% at TP 2. Bytes sent per step at "
        f"seq 256: TP {a['comm_bytes_per_step'] / 2**20:.2f} MiB, TP + SP "
        f"{b['comm_bytes_per_step'] / 2**20:.2f} MiB (the difference: the embedding's gather "
        "and the LayerNorm gradients' all-reduce).")
    cp = R["context_parallel"]
    base = {r["seq"]: r for r in rows if r["recompute"] == "none"}
    t = ["| seq | CP 1 (MiB) | CP 2 (MiB) | CP 4 (MiB) | CP 4 / CP 1 | K/V bytes sent a step, "
         "CP 4 (MiB): measured / formula |", "|---|---|---|---|---|---|"]
    for seq in seqs:
        c2 = next(r for r in cp if r["seq"] == seq and r["cp"] == 2)
        c4 = next(r for r in cp if r["seq"] == seq and r["cp"] == 4 and r["layout"] == "zigzag")
        t.append(f"| {seq} | {_m(base[seq]['measured'])} | {_m(c2['measured'])} | "
                 f"{_m(c4['measured'])} | {c4['measured'] / base[seq]['measured']:.3f} | "
                 f"{_m(c4['send_bytes_per_step'])} / {_m(c4['send_bytes_theory'])} |")
    out["cp"] = "\n".join(t) + (
        f"\n\nRank 0's activations (every rank's equal the formula), preset `{R['preset']}`, "
        f"{R['rows_per_rank']} sequences; CP 1 is the one-process run; {src}. Everything but "
        "the int64 position indices divides by W.")
    w = sorted((r for r in cp if r["seq"] == 256 and r["cp"] == 4), key=lambda r: r["layout"])
    t = ["| layout (CP 4, seq 256) | scores computed per rank, per layer, row and head | "
         "max / mean |", "|---|---|---|"]
    for r in w:
        t.append(f"| {r['layout']} | {', '.join(f'{x:,}' for x in r['attention_entries'])} | "
                 f"{r['imbalance']:.2f} |")
    out["work"] = "\n".join(t) + (
        f"\n\nMeasured by the lab (`attention_entries` in each rank's memory record; {src}). The "
        f"causal triangle holds 256 x 257 / 2 = 32,896 scores; the layouts compute "
        f"{sum(w[0]['attention_entries']):,} and {sum(w[1]['attention_entries']):,} in all (a "
        "diagonal block is computed whole, then masked). Contiguous: rank r computes r + 1 "
        "blocks, max/mean 2W/(W+1) = 1.6; zig-zag: 2W + 1 = 9 blocks of (T/2W)^2 on every rank.")
    return out


PAGES = ("activation-recomputation.md", "sequence-parallel.md", "context-parallel.md")


def render_docs(R: dict, docs: Path) -> list[str]:
    """Write each table between its ``<!-- longseq:NAME -->`` markers; the pages changed."""
    return records.fill_marked_tables(docs, PAGES, "longseq", tables(R))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dtlab.docsgen.records.long_sequences",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the record")
    p.add_argument("--img", default=None, help="folder for the pictures")
    p.add_argument("--seqs", default=",".join(map(str, SEQS)),
                   help=f"sequence lengths (default {','.join(map(str, SEQS))})")
    p.add_argument("--time-steps", type=int, default=12,
                   help="steps of the step-time runs (default 12)")
    p.add_argument("--docs", default=None,
                   help="docs folder whose measured tables to write from the record")
    p.add_argument("--redraw", action="store_true",
                   help="draw the pictures and write the tables again from --json, without "
                        "running anything")
    return p


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    if a.redraw:
        record = json.loads(Path(a.json).read_text())
        if a.docs:
            print(f"tables written in: {', '.join(render_docs(record, Path(a.docs))) or 'none'}")
        img = Path(a.img or ".")
        img.mkdir(parents=True, exist_ok=True)
        draw_recompute(record["recompute"], img / "activation-recomputation.png")
        draw_sp(record["sequence_parallel"], img / "sequence-parallel.png")
        draw_cp(record["context_parallel"], record["recompute"], img / "context-parallel.png")
        print(f"drew 3 pictures in {img}")
        return 0
    try:
        seqs = tuple(int(x) for x in a.seqs.split(","))
    except ValueError:
        raise UsageError(f"--seqs {a.seqs!r}: give comma-separated integers") from None
    if any(s % 8 for s in seqs):
        raise UsageError(f"--seqs {a.seqs}: every length must be a multiple of 8 (2 x 4 zig-zag "
                         "chunks)")
    record = {"what": "activation memory for long sequences: recomputation, sequence and "
                      "context parallelism (python -m dtlab.docsgen.records.long_sequences)",
              "date": time.strftime("%Y-%m-%d"),
              "machine": records.machine(),
              "preset": PRESET, "rows_per_rank": ROWS, "time_steps": a.time_steps}
    record["recompute"] = recompute_rows(seqs)
    record["recompute_step_time"] = step_time_rows(256, a.time_steps)
    record["sequence_parallel"] = sp_rows(seqs)
    rings: dict = {}
    record["context_parallel"] = cp_rows(seqs, rings)
    atomic_write_text(Path(a.json), json.dumps(record, indent=1) + "\n")
    print(f"wrote {a.json}")
    if a.img:
        img = Path(a.img)
        img.mkdir(parents=True, exist_ok=True)
        draw_recompute(record["recompute"], img / "activation-recomputation.png")
        draw_sp(record["sequence_parallel"], img / "sequence-parallel.png")
        draw_cp(record["context_parallel"], record["recompute"], img / "context-parallel.png")
        for layout, png in rings.items():  # drawn after the run from the blocks it recorded
            shutil.copyfile(png, img / f"ring-attention-{layout}.png")
        print(f"drew {3 + len(rings)} pictures in {img}")
    if a.docs:
        print(f"tables written in: {', '.join(render_docs(record, Path(a.docs))) or 'none'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"dtlab: error: {e}", file=sys.stderr)
        sys.exit(2)
