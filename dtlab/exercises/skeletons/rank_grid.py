"""Exercise: the grid of ranks of 3D parallelism (docs/3d-parallel.md, dtlab/train/grid.py).

With data, pipeline and tensor parallelism together, the W = DP x PP x TP ranks form a grid, and
every rank must agree on where each rank sits: which ranks share its TP group (they all-reduce
inside every layer), which hold the other stages of its pipeline (they pass activations), and
which hold the same shard in the other replicas (they average gradients). dtlab lays the grid out
with TP varying fastest, then PP, with DP outermost:

    rank = (d * PP + p) * TP + t

so ranks 0 .. TP-1 form one TP group (on a cluster: the GPUs of one node, joined by NVLink).

Write ``coords(rank, dp, pp, tp) -> (d, p, t)``, the coordinates of a rank, and
``groups(dp, pp, tp) -> {"tp": [...], "pp": [...], "dp": [...]}``: for each dimension the list of
its groups, each a list of ranks whose coordinates differ only in that dimension.

    dtlab check rank_grid --impl rank_grid.py

The checker compares both with dtlab's own Grid for every DP, PP and TP from 1 to 4, and checks
that each kind of group holds every rank exactly once.

Hints
- Peel the fastest coordinate off first: t = rank % TP, then divide by TP and go on.
- A TP group fixes (d, p) and runs t over 0 .. TP-1; a pipeline fixes (d, t); a DP group (p, t).
- Dimensions of size 1 still have groups: TP = 1 gives W groups of one rank each.
"""


def coords(rank: int, dp: int, pp: int, tp: int) -> tuple[int, int, int]:
    # TODO: (d, p, t) of rank, with t fastest and d slowest
    raise NotImplementedError("TODO: coords (t = rank % tp, then p, then d)")


def groups(dp: int, pp: int, tp: int) -> dict[str, list[list[int]]]:
    # TODO: for "tp", "pp" and "dp", every group of ranks that differ only in that coordinate
    raise NotImplementedError("TODO: groups (the tp, pp and dp groups of every rank)")
