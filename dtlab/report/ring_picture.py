"""ring.png of a context-parallel run, drawn from its record (dtlab/report/pictures.py's
``RUN_PICTURES`` draws it after ``dtlab run``, or ``python -m dtlab.report.pictures RUN_DIR``):
the causal score matrix, each block coloured by the rank that computed it and numbered with the
ring step it was computed at. labs/context_parallel.py records the blocks (``extra.ring_blocks``:
[rank, step, q_lo, q_hi, k_lo, k_hi] in global positions, from its ``ring_schedule``); within a
block a query sees the keys at or before it. Explained in docs/context-parallel.md.
"""
from __future__ import annotations

from pathlib import Path

from dtlab.plotting import plt_agg


def draw_ring(summary: dict, out: str | Path) -> Path | None:
    """ring.png in ``out``, or None when the run recorded no ring."""
    extra = summary.get("extra", {})
    blocks = extra.get("ring_blocks")
    if not blocks:
        return None
    plt = plt_agg()
    world, seq = 1 + max(b[0] for b in blocks), max(b[3] for b in blocks)
    colors = plt.get_cmap("tab10")
    img = [[(1.0, 1.0, 1.0)] * seq for _ in range(seq)]
    fig, ax = plt.subplots(figsize=(5.6, 5.6))
    for rank, step, qlo, qhi, klo, khi in blocks:
        for q in range(qlo, qhi):
            for k in range(klo, min(khi, q + 1)):   # the causal mask
                img[q][k] = colors(rank)[:3]
        ax.text((klo + khi - 1) / 2, (qlo + qhi - 1) / 2, str(step), ha="center", va="center",
                fontsize=9, color="white", weight="bold")
    for r in range(world):
        chunks = sorted({(b[2], b[3]) for b in blocks if b[0] == r})
        ax.plot([], [], "s", color=colors(r), label=f"rank {r}: " +
                ", ".join(f"[{lo},{hi})" for lo, hi in chunks))
    ax.imshow(img, extent=(-0.5, seq - 0.5, seq - 0.5, -0.5))
    ax.set(xlabel="key position", ylabel="query position", title=f"{extra.get('layout', '')}, "
           f"W={world}: colour = rank computing, number = ring step")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(out) / "ring.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
