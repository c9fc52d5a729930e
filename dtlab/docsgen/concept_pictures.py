"""Concept pictures for docs/, drawn from the functions the code runs, not by hand: the ring
all-reduce's steps (``dtlab.collectives.ring.schedule``), what ZeRO keeps on a rank at each stage
(``costmodel.zero_states``), the column/row split of the MLP (``ring.chunk_sizes``, the cut
``shard_layers`` makes) and the parallel grid on nodes (``Grid.coords``). Ring attention's
picture comes from the context-parallel lab's own run (``python -m dtlab.docsgen.records.long_sequences``).

    python -m dtlab.docsgen.concept_pictures docs/img
"""
from __future__ import annotations

import sys
from pathlib import Path

from dtlab.collectives.ring import chunk_sizes, schedule
from dtlab.costmodel.shapes import zero_states
from dtlab.train.grid import Grid
from dtlab.train.model import preset_shape
from dtlab.plotting import plt_agg

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt_agg().close(fig)
    return path


def ring_states(world: int) -> list[list[list[set[int]]]]:
    """Replay ``ring.schedule`` on W ranks: before the first step and after each of the 2(W-1),
    ``states[s][r][c]`` is the set of ranks whose values rank r's chunk c holds summed."""
    held = [[{r} for _ in range(world)] for r in range(world)]
    states = [held]
    for s in range(2 * (world - 1)):
        new = [[set(x) for x in row] for row in held]
        for r in range(world):  # every rank sends at once: apply step s to a copy
            phase, send, _ = schedule(r, world)[s]
            right = (r + 1) % world
            if phase == "reduce-scatter":  # the right neighbour adds it in
                new[right][send] |= held[r][send]
            else:  # all-gather: the right neighbour stores it
                new[right][send] = set(held[r][send])
        held = new
        states.append(held)
    return states


def draw_ring(path: Path, world: int = 4) -> Path:
    """One panel a step, one column a rank: each chunk coloured by its index and darker the more
    ranks' values it holds summed (the number)."""
    plt = plt_agg()
    fig, axes = plt.subplots(1, 2 * world - 1, figsize=(2.2 * (2 * world - 1), 3.2),
                             sharey=True)
    for s, (ax, held) in enumerate(zip(axes, ring_states(world))):
        phase = schedule(0, world)[s - 1][0] if s else "start"
        for r in range(world):
            for c in range(world):
                ax.add_patch(plt.Rectangle((r, world - 1 - c), 0.9, 0.9, color=COLOURS[c],
                                           alpha=0.25 + 0.75 * len(held[r][c]) / world))
                ax.text(r + 0.45, world - 0.55 - c, str(len(held[r][c])), ha="center",
                        va="center", fontsize=8)
        ax.set(xlim=(0, world), ylim=(0, world), xticks=[r + 0.45 for r in range(world)],
               xticklabels=[f"r{r}" for r in range(world)], yticks=[],
               title=f"{phase}\n(after step {s})" if s else "before", aspect="equal")
        ax.title.set_fontsize(8)
    axes[0].set_ylabel("chunk 0 (top) .. W-1", fontsize=8)
    fig.suptitle(f"ring all-reduce, W = {world}: each step every rank sends one chunk to its right"
                 " (numbers: ranks summed into the chunk)", fontsize=9)
    return _save(fig, path)


def draw_zero(path: Path, dp: int = 4) -> Path:
    """Bytes of weights, gradients and AdamW state on one rank at stages 0-3 (tiny preset), as
    ``costmodel.zero_states`` counts them for labs/zero.py, padding included."""
    plt = plt_agg()
    tiny, _ = preset_shape("tiny")
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    cats = (("params", "weights"), ("grads", "gradients"), ("optimizer", "AdamW state"))
    for stage in range(4):
        st = zero_states(tiny, dp, stage) if stage else zero_states(tiny, 1, 3)  # = DDP
        left = 0.0
        for i, (key, name) in enumerate(cats):
            kib = st[key] / 2**10
            ax.barh(stage, kib, left=left, color=COLOURS[i], label=name if stage == 0 else None)
            if kib > 20:
                ax.text(left + kib / 2, stage, f"{kib:.0f}", ha="center", va="center",
                        fontsize=8, color="white")
            left += kib
    one = zero_states(tiny, dp, 1)
    if one["grads"] > zero_states(tiny, 1, 3)["grads"]:  # say why, beside the bar
        ax.annotate(f"gradients: ZeRO-1 keeps the full ones\nuntil the step and its reduced "
                    f"1/{dp}\nshard: 4P + 4P/{dp}, more than DDP's 4P",
                    xy=(sum(one[k] for k in ("params", "grads", "optimizer")) / 2**10, 1),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=7.5)
    ax.set_yticks(range(4), ["DDP (stage 0)", "ZeRO-1", "ZeRO-2", "ZeRO-3"])
    ax.invert_yaxis()
    ax.set(xlabel=f"KiB on one rank of {dp} (tiny preset, fp32)",
           title=f"what a rank keeps: ZeRO shards optimizer, then gradients, then weights over "
                 f"{dp} ranks")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def draw_tp_split(path: Path, d: int = 8, ffn: int = 32, tp: int = 2) -> Path:
    """The MLP's two matrices cut over ``tp`` ranks: fc by its output rows (column parallel:
    each rank computes its slice of the hidden layer with no communication in the forward; the
    backward all-reduces the input's gradient), proj by its input columns (row parallel: each
    rank a partial sum, one all-reduce in the forward, none in the backward)."""
    plt = plt_agg()
    cuts = chunk_sizes(ffn, tp)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    lo = 0
    for t, n in enumerate(cuts):
        a.add_patch(plt.Rectangle((0, ffn - lo - n), d, n, color=COLOURS[t], alpha=0.6))
        a.text(d / 2, ffn - lo - n / 2, f"rank {t}: rows {lo}-{lo + n - 1}", ha="center",
               va="center", fontsize=8)
        b.add_patch(plt.Rectangle((lo, 0), n, d, color=COLOURS[t], alpha=0.6))
        b.text(lo + n / 2, d / 2, f"rank {t}\ncols {lo}-{lo + n - 1}", ha="center",
               va="center", fontsize=8)
        lo += n
    a.set(xlim=(0, d), ylim=(0, ffn), xlabel=f"d_model = {d}", ylabel=f"d_ff = {ffn}",
          title="fc (column parallel): h_t = x W1_t\nforward: no communication; backward: all-reduce of dL/dx")
    b.set(xlim=(0, ffn), ylim=(0, d), xlabel=f"d_ff = {ffn}", ylabel=f"d_model = {d}",
          title="proj (row parallel): y = sum_t h_t W2_t\nforward: all-reduce of y; backward: no communication")
    for ax in (a, b):
        ax.title.set_fontsize(9)
    return _save(fig, path)


def crossings(g: Grid, per_node: int) -> dict[str, bool]:
    """Whether any pair of neighbours in each kind of group (tp, pp, dp) sits on two nodes."""
    node = lambda r: r // per_node  # noqa: E731
    out = {"tp": False, "pp": False, "dp": False}
    for r in range(g.world):
        d, p, t = g.at(r).coords
        if t + 1 < g.tp:
            out["tp"] |= node(r) != node(g.rank_of(d, p, t + 1))
        if p + 1 < g.pp:
            out["pp"] |= node(r) != node(g.rank_of(d, p + 1, t))
        if d + 1 < g.dp:
            out["dp"] |= node(r) != node(g.rank_of(d + 1, p, t))
    return out


def draw_grid(path: Path, dp: int = 2, pp: int = 2, tp: int = 2, per_node: int = 4) -> Path:
    """Ranks of a dp x pp x tp grid on nodes of ``per_node`` devices, each labelled with its
    coordinates from ``Grid.coords``: TP groups (same colour) are consecutive ranks; arrows join
    a rank to its next pipeline stage and to its next data-parallel replica. The title says
    which kinds of neighbours cross nodes, as ``crossings`` finds them in this layout (here
    TP and PP stay inside a node and only DP crosses)."""
    plt = plt_agg()
    g = Grid(dp=dp, pp=pp, tp=tp)
    world = g.world
    nodes = -(-world // per_node)
    fig, ax = plt.subplots(figsize=(2.0 * per_node + 1.6, 1.9 * nodes + 1.2))

    def centre(r: int) -> tuple[float, float]:
        node, slot = divmod(r, per_node)
        return slot * 2 + 0.9, (nodes - 1 - node) * 1.9 + 0.55

    for r in range(world):
        d, p, t = g.at(r).coords
        node, slot = divmod(r, per_node)
        group = r // tp  # the TP group: consecutive ranks
        ax.add_patch(plt.Rectangle((slot * 2, (nodes - 1 - node) * 1.9), 1.8, 1.1,
                                   color=COLOURS[group % len(COLOURS)], alpha=0.5))
        x, y = centre(r)
        ax.text(x, y, f"rank {r}\ndp {d}  pp {p}  tp {t}", ha="center", va="center", fontsize=8)
    shown = set()
    for r in range(world):
        d, p, t = g.at(r).coords
        pairs = ([("pp", g.rank_of(d, p + 1, t))] if p + 1 < pp else []) + \
                ([("dp", g.rank_of(d + 1, p, t))] if d + 1 < dp else [])
        for kind, other in pairs:
            (x0, y0), (x1, y1) = centre(r), centre(other)
            style = {"pp": dict(color="black", ls="-"), "dp": dict(color="tab:red", ls="--")}[kind]
            if y1 == y0:  # along a node: from top edge to top edge, arched above
                start, end, arc = (x0, y0 + 0.58), (x1, y1 + 0.58), "arc3,rad=-0.25"
            else:  # down to the next node: bottom edge to top edge (a box is 1.1 high)
                start, end, arc = (x0, y0 - 0.58), (x1, y1 + 0.58), "arc3"
            ax.annotate("", xy=end, xytext=start,
                        arrowprops=dict(arrowstyle="->", lw=1.2, connectionstyle=arc, **style))
            if kind not in shown:
                ax.plot([], [], lw=1.2, **style, label={
                    "pp": "next pipeline stage (send activations)",
                    "dp": "next data-parallel replica (all-reduce gradients)"}[kind])
                shown.add(kind)
    for node in range(nodes):
        ax.add_patch(plt.Rectangle((-0.1, (nodes - 1 - node) * 1.9 - 0.1), per_node * 2,
                                   1.3, fill=False, lw=1.5, ls="--"))
        ax.text(-0.3, (nodes - 1 - node) * 1.9 + 0.55, f"node {node}", ha="right",
                va="center", fontsize=9)
    cross = crossings(g, per_node)
    inside = [k.upper() for k in ("tp", "pp", "dp") if not cross[k]]
    across = [k.upper() for k in ("tp", "pp", "dp") if cross[k]]
    ax.set(xlim=(-1.6, per_node * 2), ylim=(-0.4, nodes * 1.9 - 0.2), xticks=[], yticks=[],
           title=f"dp {dp} x pp {pp} x tp {tp} on {nodes} nodes of {per_node} (one colour a TP "
                 f"group): {' and '.join(inside) or 'no'} neighbours inside a node, "
                 f"{' and '.join(across) or 'none'} across")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    for side in ax.spines.values():
        side.set_visible(False)
    return _save(fig, path)


def draw_all(img: Path) -> list[Path]:
    img = Path(img)
    img.mkdir(parents=True, exist_ok=True)
    return [draw_ring(img / "concept-ring.png"), draw_zero(img / "concept-zero.png"),
            draw_tp_split(img / "concept-tp-split.png"), draw_grid(img / "concept-grid.png")]


if __name__ == "__main__":
    for p in draw_all(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")):
        print(p)
