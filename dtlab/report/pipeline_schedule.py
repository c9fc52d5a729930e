"""A pipeline run read back from its record: the bubble, an ideal replay, the schedule picture.

labs/pipeline.py records every rank's action list (``extra.actions``) and, for each step, when
each action worked (``extra.timelines``, rank by rank). From those alone this module gives the
measured bubble beside the schedule's formula (dtlab/costmodel/shapes.py) and beside an ideal
replay of the same lists, and draws the schedule.

    python -m dtlab.report.pipeline_schedule RUN_DIR   # its figures (and RUN_DIR/schedule.png)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dtlab.costmodel.shapes import bubble
from dtlab.plotting import plt_agg


def Patch(**kw):
    """A legend's coloured box (matplotlib is imported on first use)."""
    from matplotlib.patches import Patch as _Patch
    return _Patch(**kw)


def _parts(action) -> tuple[str, int, int]:
    """(kind, micro-batch, chunk) of an action; one-chunk schedules leave the chunk out."""
    kind, i, *chunk = action
    return kind, i, (chunk or [0])[0]


def ideal(lists: list[list], v: int = 1) -> dict:
    """Replay every rank's action list (``lists[r]``, rank r) with unit costs (F 1/V, B 2/V, or
    B = W = 1/V where the lists split the backward) and free messages: the bubble and the most
    live micro-batches per rank (activations are released by B, or by W when split). Raises if
    the lists deadlock."""
    p = len(lists)
    split = any(a[0] == "W" for x in lists for a in x)
    cost = {"F": 1 / v, "B": (1 if split else 2) / v, "W": 1 / v}
    done, pos, clock = {}, [0] * p, [0.0] * p
    moved = True
    while moved:
        moved = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                kind, i, c = _parts(lists[r][pos[r]])
                vs = c * p + r  # chunk c of rank r is virtual stage c P + r
                need = {"F": [("F", i, vs - 1)] if vs else [],
                        "B": [("F", i, vs)] + ([("B", i, vs + 1)] if vs < p * v - 1 else []),
                        "W": [("B", i, vs)]}[kind]
                if any(n not in done for n in need):
                    break
                clock[r] = max([clock[r]] + [done[n] for n in need]) + cost[kind]
                done[(kind, i, vs)] = clock[r]
                pos[r] += 1
                moved = True
    if pos != [len(x) for x in lists]:
        raise RuntimeError(f"the action lists deadlock at P={p}, V={v}: each rank stops at "
                           f"action {pos}")
    busy = sum(cost[a[0]] for x in lists for a in x) / p
    release = "W" if split else "B"
    peaks = []
    for x in lists:
        alive = peak = 0
        for a in x:
            alive += 1 if a[0] == "F" else -1 if a[0] == release else 0
            peak = max(peak, alive)
        peaks.append(peak)
    return {"bubble": 1 - busy / max(clock), "peak_live": peaks}


def measured_bubble(timelines: list[list]) -> float | None:
    """Per step, 1 - (a rank's mean time in its actions) / (the first action's start to the
    last action's end, over all ranks), averaged over the steps; the first step is left out
    where there are more (it includes warm-up: allocations, connections). None if no step ran.
    ``timelines[r][step]``: rank r's (start, end) of every action, one clock for all ranks."""
    steps = list(zip(*timelines))
    steps = steps[1:] or steps
    bubbles = []
    for tls in steps:
        start = min(s for tl in tls for s, _ in tl)
        end = max(e for tl in tls for _, e in tl)
        busy = sum(e - s for tl in tls for s, e in tl) / len(tls)
        bubbles.append(1 - busy / (end - start))
    return sum(bubbles) / len(bubbles) if bubbles else None


def figures(extra: dict) -> dict:
    """The figures of an own-schedule run's record (its ``extra``): the measured bubble, the
    formula's, the replay's, and the replay's live micro-batches per rank (set them beside the
    record's ``peak_live_microbatches``)."""
    p, m, v = extra["stages"], extra["microbatches"], extra.get("virtual_stages", 1)
    best = ideal(extra["actions"], v)
    return {"bubble_measured": measured_bubble(extra["timelines"]),
            "bubble_theory": bubble(p, m, extra["schedule"], v), "bubble_ideal": best["bubble"],
            "peak_live_theory": best["peak_live"]}


COLOURS = {"F": "#4c78a8", "B": "#59a14f", "W": "#f28e2b"}

FORMULAS = {"interleaved": "(P-1)/(VM+P-1)", "zbh1": "(P-1)/(3M+P-1)"}  # else (P-1)/(M+P-1)


def draw_schedule(summary: dict, out: str | Path) -> Path | None:
    """schedule.png in ``out``: the run's last step, one row per rank, forwards blue, backwards
    green (B of a split backward green, W orange), each labelled with its micro-batch (and
    chunk, interleaved: one prime a chunk); gaps are the bubble. None where the record holds no
    step of our schedules (torch's runs, a run resumed at its last step). One of
    dtlab/report/pictures.py's ``RUN_PICTURES``, drawn after every ``dtlab run``."""
    e = summary.get("extra", {})
    if not e.get("timelines") or not e["timelines"][0]:
        return None
    plt = plt_agg()
    f = figures(e)
    tls = [tl[-1] for tl in e["timelines"]]
    t0 = min(s for tl in tls for s, _ in tl)
    p, v = e["stages"], e.get("virtual_stages", 1)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(tls) + 1.8))
    for r, (tl, acts) in enumerate(zip(tls, e["actions"])):
        for (s, end), action in zip(tl, acts):
            kind, i, chunk = _parts(action)
            ax.barh(r, (end - s) * 1e3, left=(s - t0) * 1e3, height=0.8, color=COLOURS[kind],
                    alpha=1.0 if chunk % 2 == 0 else 0.65, edgecolor="white")
            ax.text((s - t0 + (end - s) / 2) * 1e3, r, f"{kind}{i}" + "'" * chunk,
                    ha="center", va="center", color="white", fontsize=7)
    ax.set_yticks(range(len(tls)), [f"stage {r}" if v == 1 else f"rank {r}"
                                    for r in range(len(tls))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (white gaps are the bubble)")
    kinds = {k for acts in e["actions"] for k, _, _ in map(_parts, acts)}
    names = {"F": "F3: forward of micro-batch 3",
             "B": "B3: backward" if "W" not in kinds else "B3: backward, input gradient",
             "W": "W3: backward, weight gradient"}
    handles = [Patch(color=COLOURS[k], label=names[k]) for k in "FBW" if k in kinds]
    if v > 1:  # what the primes mean
        handles += [Patch(color=COLOURS["F"], alpha=0.65,
                          label=f"F3', B3' (lighter): micro-batch 3 on the rank's second chunk "
                                f"of layers, model stage rank + {p}"
                                + ("; '' the third chunk, stage rank + 2P ..." if v > 2 else ""))]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32),
              ncol=min(len(handles), 2 if v > 1 else 3), frameon=False)
    ax.set_title(f"{summary['variant']}: measured bubble {f['bubble_measured']:.3f}, theory "
                 f"{FORMULAS.get(e['schedule'], '(P-1)/(M+P-1)')} = {f['bubble_theory']:.3f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(out) / "schedule.png", dpi=110)
    plt.close(fig)
    return Path(out) / "schedule.png"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dtlab.report.pipeline_schedule",
                                description=__doc__.splitlines()[0])
    p.add_argument("run", metavar="RUN_DIR", help="the --out folder of a pipeline run")
    return p


def main(argv=None) -> int:
    run = Path(make_parser().parse_args(argv).run)
    summary = json.loads((run / "summary.json").read_text())
    if "timelines" not in summary.get("extra", {}):
        print(f"{run}: not a run of our pipeline schedules (no timelines in its record)",
              file=sys.stderr)
        return 2
    print(json.dumps(figures(summary["extra"]), indent=1))
    png = draw_schedule(summary, run)
    print(f"wrote {png}" if png else "no step ran (a resumed run at its last step): no picture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
