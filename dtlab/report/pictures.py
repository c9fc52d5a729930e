"""Pictures of run records (matplotlib through dtlab/plotting.py): the tour's loss, memory and
communication pictures, and each run's own pictures drawn from its record
(``draw_run_pictures``): the labs record what they did and draw nothing themselves.

    python -m dtlab.report.pictures RUN_DIR      # the pictures of a run started by hand
"""
from __future__ import annotations

import sys
from pathlib import Path

from dtlab.plotting import plt_agg
from dtlab.report.pipeline_schedule import draw_schedule
from dtlab.report.ring_picture import draw_ring
from dtlab.report.tables import _floats, run_label


# The tour's pictures are small multiples: one panel a lab family, so that no panel holds more
# runs than a 10-colour cycle tells apart and every legend can be read at page width.
FAMILIES = (("baseline", ("baseline",)),
            ("data parallel", ("dataparallel", "torch_multiprocessing", "ring_allreduce", "ddp",
                               "accelerate_lab")),
            ("mixed precision", ("amp",)),
            ("ZeRO", ("zero", "deepspeed_zero", "fsdp")),
            ("tensor parallel", ("tensor_parallel",)),
            ("pipeline and 3D", ("pipeline", "parallel3d")),
            ("sequence and experts", ("context_parallel", "expert_parallel")))

FP32_BOUND = 1e-5  # the loss bound of an fp32 run (dtlab/harness.py's default tolerance)


def family(s: dict) -> str:
    """The lab family a run is drawn with (a lab no family names is its own)."""
    return next((name for name, labs in FAMILIES if s["lab"] in labs), s["lab"])


def by_family(summaries: list[dict]) -> list[tuple[str, list[dict]]]:
    """Runs grouped by family, families in FAMILIES' order, then any other lab in run order."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(family(s), []).append(s)
    order = [name for name, _ in FAMILIES if name in groups]
    return [(name, groups[name]) for name in order + [g for g in groups if g not in order]]


def colours(n: int) -> list:
    """n distinct colours (tab10, then tab20 past ten)."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap.colors[i % len(cmap.colors)] for i in range(n)]


def bound_note(s: dict) -> str:
    """How a run is judged, where it is not by the fp32 bound: its own looser bound (mixed
    precision), or not at all (its drift is expected: a skipped step, dropped tokens)."""
    b = s.get("baseline") or {}
    bound = (b.get("tolerance") or {}).get("loss_rel", FP32_BOUND)
    if b.get("ok") is None and b.get("max_rel_loss_diff") is not None:
        return "not judged: " + (b.get("note") or "drifts by design").split(":")[0]
    if bound > FP32_BOUND:
        return f"own bound {bound:.0e}"
    return ""


def plot_losses(summaries: list[dict], path: Path) -> Path:
    """Small multiples, one row each: the baselines' loss curves with every run's curve over
    them, then one panel a lab family of each run's distance from its baseline, step by step,
    against the fp32 bound; a run held to a looser bound draws that bound in its colour, and a
    run not judged (its drift is expected) is dashed."""
    plt = plt_agg()
    compared = [s for s in summaries if s["baseline"].get("losses")]
    families = by_family(compared)
    fig, axes = plt.subplots(1 + len(families), 1, sharex=True, squeeze=False,
                             figsize=(10.5, 2.3 * (1 + len(families)) + 0.4))
    top, rest = axes[0][0], [row[0] for row in axes[1:]]
    refs = {}
    for s in compared:
        refs.setdefault((s["preset"], s["batch_size"]), s["baseline"]["losses"])
        top.plot(_floats(s["losses"]), color="0.75", lw=0.8)
    for k, ((preset, batch), base) in enumerate(refs.items()):
        top.plot(_floats(base), color=colours(len(refs))[k], lw=2,
                 label=f"baseline: {preset} preset, batch {batch}")
    if not compared:  # a list of baseline runs only
        for s in summaries:
            top.plot(_floats(s["losses"]), lw=2, label=run_label(s))
    top.plot([], [], color="0.75", lw=0.8, label="every run (each on its baseline)")
    top.set(ylabel="loss", title="loss of the global batch: every run lies on its baseline")
    for ax, (name, group) in zip(rest, families):
        for s, c in zip(group, colours(len(group))):
            note = bound_note(s)
            judged = not note.startswith("not judged")
            d = [max(abs(x - y) / max(abs(y), 1e-12), 1e-9)
                 for x, y in zip(_floats(s["losses"]), _floats(s["baseline"]["losses"]))]
            ax.semilogy(d, color=c, lw=1.3, ls="-" if judged else "--", marker="o", ms=2.5,
                        label=run_label(s) + (f"\n    {note}" if note else ""))
            bound = s["baseline"]["tolerance"]["loss_rel"]
            if judged and bound > FP32_BOUND:  # its own bound, in its colour
                ax.axhline(bound, color=c, lw=1.2, ls="-.")
        ax.axhline(FP32_BOUND, color="red", lw=1, ls=":", label="fp32 bound 1e-5")
        ax.set_ylim(5e-10, 0.5)
        ax.set_yticks([1e-9, 1e-7, 1e-5, 1e-3, 1e-1])
        ax.set(ylabel="relative distance",
               title=f"{name}: |loss - baseline| / baseline (1e-9 drawn for equal)")
    (rest[-1] if rest else top).set_xlabel("step")
    for ax in [top] + rest:
        ax.title.set_fontsize(10)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


STATES = ("params", "grads", "optimizer")


def activations_bar(s: dict) -> tuple[float, str]:
    """Rank 0's peak saved activations in bytes, and where the figure comes from. A
    dataparallel record from before its lab reported device 0's meter holds 0 there and the
    figure in ``extra.replica_bytes`` (replica 0, device 0); that one is drawn, and marked."""
    m = s["memory"]["per_rank"][0]
    replicas = s.get("extra", {}).get("replica_bytes") or []
    if not m.get("activations_peak") and replicas and replicas[0].get("activations"):
        return replicas[0]["activations"], "replica_bytes"
    return m.get("activations_peak", 0), ""


def _family_rows(runs: list[dict]) -> tuple[list[float], list[dict], list[tuple[str, float]]]:
    """y positions of the runs, family by family with a gap above each family for its name,
    and where each name goes."""
    ys, order, names, y = [], [], [], 0.0
    for name, group in by_family(runs):
        names.append((name, y - 0.05))
        y += 0.7
        for s in group:
            ys.append(y)
            order.append(s)
            y += 1
    return ys, order, names


def _name_families(ax, names: list[tuple[str, float]]) -> None:
    for name, y in names:
        ax.annotate(name, xy=(0, y), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=8,
                    weight="bold", color="0.3")


def plot_memory(summaries: list[dict], path: Path) -> Path:
    """Rank 0's model states by category (stacked, ZeRO's formula as a black tick) and its peak
    saved activations, one row a run, runs grouped by lab family; one row of axes a preset, so a
    bigger model's bars do not flatten the small one's."""
    plt = plt_agg()
    runs = [s for s in summaries if s["memory"]["per_rank"]]
    presets = list(dict.fromkeys(s["preset"] for s in runs)) or ["-"]
    rows = [_family_rows([s for s in runs if s["preset"] == p]) for p in presets]
    heights = [max(3.0, (ys[-1] if ys else 0) + 1.5) for ys, _, _ in rows]
    fig, axes = plt.subplots(len(presets), 2, squeeze=False, sharey="row",
                             figsize=(11, 0.25 * sum(heights) + 1.3 * len(presets)),
                             gridspec_kw={"width_ratios": [3, 2], "height_ratios": heights})
    cat_colours = dict(zip(STATES, ("tab:blue", "tab:orange", "tab:green")))
    for (a, b), preset, (ys, group, names) in zip(axes, presets, rows):
        left = [0.0] * len(group)
        for cat in STATES:
            vals = [s["memory"]["per_rank"][0].get(cat, 0) / 2**10 for s in group]
            a.barh(ys, vals, left=left, height=0.75, color=cat_colours[cat], label=cat)
            left = [u + v for u, v in zip(left, vals)]
        shown = False
        for y, s in zip(ys, group):
            f = s.get("extra", {}).get("memory_formula")
            if f and "device" in f:
                total = sum(f["device"].get(k, 0) for k in STATES) / 2**10
                a.plot([total, total], [y - 0.45, y + 0.45], "k-", lw=2.5,
                       label=None if shown else "ZeRO formula's total")
                shown = True
        for y, s in zip(ys, group):
            v, src = activations_bar(s)
            b.barh(y, v / 2**10, height=0.75, color="tab:red", hatch="//" if src else None,
                   edgecolor="white" if src else None)
            if src:  # drawn from the lab's own per-replica count, and said so
                b.annotate(" device 0's replica, from\n extra.replica_bytes (the\n record's "
                           "activations_peak: 0)", xy=(v / 2**10, y), fontsize=7, va="center")
        a.set_yticks(ys, [run_label(s) for s in group], fontsize=8)
        a.set(xlabel="KiB", title=f"{preset} preset: model states on rank 0")
        b.set(xlabel="KiB", title=f"{preset} preset: peak saved activations, rank 0")
        for ax in (a, b):
            ax.set_ylim((ys[-1] if ys else 0) + 0.8, -0.6)
            ax.title.set_fontsize(10)
            ax.grid(axis="x", alpha=0.3)
            _name_families(ax, names)
        if preset == presets[0]:  # one legend: the same colours in every row
            a.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comm(summaries: list[dict], path: Path) -> Path:
    """Bytes rank 0 sends a step (counted at the collectives), one row a multi-process run,
    coloured and grouped by lab family, on a log scale (a pipeline cut's KiB beside 3D's MiB)."""
    plt = plt_agg()
    runs = [s for s in summaries if s["world_size"] > 1]
    ys, group, names = _family_rows(runs)
    fig, ax = plt.subplots(figsize=(10, 0.27 * len(group) + 0.4 * len(names) + 1.4))
    fam_colour = dict(zip([n for n, _ in names], colours(len(names))))
    kib = [s["comm"]["bytes_per_step"] / 2**10 for s in group]
    bars = ax.barh(ys, kib, height=0.75, color=[fam_colour[family(s)] for s in group])
    ax.bar_label(bars, [f"{v:,.0f}" for v in kib], fontsize=7, padding=2)
    presets = [s["preset"] for s in group]
    usual = max(set(presets), key=presets.count) if presets else ""  # the others are named
    ax.set_yticks(ys, [run_label(s) + ("" if s["preset"] == usual else f", {s['preset']} preset")
                       for s in group], fontsize=8)
    ax.set_ylim((ys[-1] if ys else 0) + 0.8, -0.6)
    _name_families(ax, names)
    if any(kib):
        ax.set_xscale("log")
        ax.set_xlim(right=max(kib) * 3)
    if not names:
        ax.text(0.5, 0.5, "no multi-process run", ha="center", transform=ax.transAxes)
    ax.set(xlabel="KiB sent per step by rank 0 (log scale)",
           title="communication per step, counted at the collectives")
    ax.title.set_fontsize(10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_loss_scale(summary: dict, out: Path) -> Path | None:
    """loss_scale.png: the dynamic loss scale per step and the skipped steps, those that backed
    the scale off apart from those that did not (DeepSpeed's hysteresis), under a title naming
    the rules followed (``extra.loss_scale_rules``, where the record has them)."""
    extra = summary.get("extra", {})
    scales, skipped = extra.get("loss_scale"), extra.get("skipped_steps", [])
    if not scales:
        return None
    title = extra.get("loss_scale_title", summary.get("variant", ""))
    rules = extra.get("loss_scale_rules") or {}
    halved = [i for i in skipped if i > 0 and scales[i] < scales[i - 1]]
    kept = [i for i in skipped if i > 0 and scales[i] >= scales[i - 1]]
    unknown = [i for i in skipped if i == 0]  # the scale before the first step is not recorded
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(8, 3.9))
    ax.step(range(len(scales)), scales, where="post", label="loss scale after the step")
    ax.scatter(halved + unknown, [scales[i] for i in halved + unknown], color="red", zorder=3,
               label="overflow: step skipped, scale backed off")
    if kept:
        ax.scatter(kept, [scales[i] for i in kept], facecolor="white", edgecolor="red", lw=1.5,
                   zorder=3, label="overflow: step skipped, scale kept (hysteresis)")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    if rules.get("rules") == "deepspeed":
        h, gi = rules["hysteresis"], rules["growth_interval"]
        refill = "any clean step" if rules.get("consecutive_hysteresis") else "a growth"
        first = "the first overflow keeps" if h == 2 else f"the first {h - 1} overflows keep"
        how = (f"DeepSpeed's rules, hysteresis {h}: after the start or {refill}, {first} the "
               f"scale,"
               f"\nlater ones back it off (x{rules['backoff']:g}); it doubles once {gi} clean "
               f"steps have passed") if h > 1 else \
              (f"DeepSpeed's rules, hysteresis 1: every overflow backs the scale off "
               f"(x{rules['backoff']:g}); it doubles once {gi} clean steps have passed")
    elif rules:
        how = (f"torch GradScaler's rules: every overflow backs the scale off "
               f"(x{rules['backoff']:g}); it doubles after {rules['growth_interval']} clean "
               f"steps in a row")
    else:
        how = ""
    ax.set_title(f"dynamic loss scaling ({title})" + (f"\n{how}" if how else ""),
                 fontsize=10 if how else 12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=7.5,
              frameon=False)
    fig.tight_layout()
    fig.savefig(Path(out) / "loss_scale.png", dpi=110)
    plt.close(fig)
    return Path(out) / "loss_scale.png"


def draw_experts(summary: dict, out: Path) -> Path | None:
    """experts.png (expert_parallel's runs): the token assignments each expert received, per
    MoE layer, over the steps (``extra.tokens_per_expert``: [step][layer][expert])."""
    tokens = summary.get("extra", {}).get("tokens_per_expert")
    if not tokens:
        return None
    plt = plt_agg()
    layers = len(tokens[0])
    fig, axes = plt.subplots(1, layers, figsize=(4.2 * layers, 3.4), sharey=True, squeeze=False)
    for li, ax in enumerate(axes[0]):
        per_step = [step[li] for step in tokens]
        for e in range(len(per_step[0])):
            ax.plot([s[e] for s in per_step], marker="o", ms=3, label=f"expert {e}")
        ax.set(title=f"block {li}", xlabel="step")
    axes[0][0].set_ylabel("token assignments received")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{summary.get('variant', '')}: tokens per expert (the router's balance)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(out) / "experts.png", dpi=110)
    plt.close(fig)
    return Path(out) / "experts.png"


# a run's own pictures, drawn from its record: each drawer returns the PNG it wrote, or None when
# the record holds nothing for it
RUN_PICTURES = (draw_loss_scale, draw_experts, draw_ring, draw_schedule)


def draw_run_pictures(out: str | Path) -> list[Path]:
    """Every picture the run in ``out`` (its summary.json) has material for, into ``out``."""
    import json
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    return [p for draw in RUN_PICTURES if (p := draw(summary, out)) is not None]


def make_parser():
    import argparse
    p = argparse.ArgumentParser(prog="python -m dtlab.report.pictures",
                                description="draw a run's pictures from its record")
    p.add_argument("run_dir", nargs="+", help="a run's --out folder (holding summary.json)")
    return p


def main(argv=None) -> int:
    for folder in make_parser().parse_args(argv).run_dir:
        for path in draw_run_pictures(folder):
            print(f"picture: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
