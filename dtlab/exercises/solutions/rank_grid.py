"""Reference solution: the coordinates and groups of a DP x PP x TP grid of ranks, TP fastest."""


def coords(rank: int, dp: int, pp: int, tp: int) -> tuple[int, int, int]:
    return rank // (pp * tp), (rank // tp) % pp, rank % tp


def groups(dp: int, pp: int, tp: int) -> dict[str, list[list[int]]]:
    rank = lambda d, p, t: (d * pp + p) * tp + t  # noqa: E731
    return {"tp": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
            "pp": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
            "dp": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)]}
