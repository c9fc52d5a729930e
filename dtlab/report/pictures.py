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
    plt = plt_agg()
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
    plt = plt_agg()
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
    plt = plt_agg()
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


def draw_loss_scale(summary: dict, out: Path) -> Path | None:
    """loss_scale.png: the dynamic loss scale per step, skipped steps marked (amp's runs)."""
    extra = summary.get("extra", {})
    scales, skipped = extra.get("loss_scale"), extra.get("skipped_steps", [])
    if not scales:
        return None
    title = extra.get("loss_scale_title", summary.get("variant", ""))
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.step(range(len(scales)), scales, where="post", label="loss scale after the step")
    ax.scatter(skipped, [scales[i] for i in skipped], color="red", zorder=3,
               label="overflow: step skipped")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.set_title(f"dynamic loss scaling ({title})")
    ax.legend(loc="best", fontsize=8)
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
