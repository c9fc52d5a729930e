"""The check of the expert_dispatch exercise: expert dispatch and return over uneven all-to-alls."""
from __future__ import annotations

from dtlab.exercises.checks.common import _describe, _first_diff, _quiet


DISPATCH_CASES = {
    2: [("uneven splits", [[1, 3], [4, 0]]), ("rank 1 has no rows", [[2, 3], [0, 0]])],
    3: [("uneven splits", [[2, 0, 3], [1, 1, 0], [4, 2, 1]]),
        ("rank 1 has no rows", [[1, 2, 2], [0, 0, 0], [3, 1, 0]])],
}
SPLITS_SWAPPED = ("splits are swapped: all_to_all_single(output, input, output_split_sizes, "
                  "input_split_sizes) takes what this rank receives from each rank first, then "
                  "what it sends")


def _dispatch_rows(counts, src: int, case: int):
    """(x, dest) of rank ``src``: rows [src, i, noise], destinations shuffled."""
    import torch
    g = torch.Generator().manual_seed(1000 * case + src)
    dest = torch.tensor([j for j, c in enumerate(counts[src]) for _ in range(c)],
                        dtype=torch.int64)
    dest = dest[torch.randperm(len(dest), generator=g)]
    if len(set(dest.tolist())) > 1 and bool((dest[1:] >= dest[:-1]).all()):
        dest = dest.flip(0)  # never already sorted: the order of the way back must matter
    n = len(dest)
    x = torch.stack([torch.full((n,), float(src), dtype=torch.float64),
                     torch.arange(n, dtype=torch.float64),
                     torch.rand(n, generator=g, dtype=torch.float64)], dim=1) if n else \
        torch.empty(0, 3, dtype=torch.float64)
    return x, dest


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    import torch.distributed as dist
    real = dist.all_to_all_single
    phase = {"now": "", "splits": None}

    def checked(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
        """Refuse swapped splits on every rank at once (the ranks agree first), instead of a
        size error on some ranks and a hang on the others."""
        said = ""
        if output_split_sizes is not None and phase["splits"] is not None:
            right = phase["splits"]
            given = (list(map(int, output_split_sizes)), list(map(int, input_split_sizes or [])))
            if given == right[::-1] and right[0] != right[1]:
                said = f"in {phase['now']}: {SPLITS_SWAPPED} (this rank receives " \
                       f"{right[0]} and sends {right[1]}; you passed output_split_sizes=" \
                       f"{given[0]}, input_split_sizes={given[1]})"
        verdicts = [None] * world
        dist.all_gather_object(verdicts, said)
        if any(verdicts):
            raise ValueError(said or next(v for v in verdicts if v))
        return real(output, input, output_split_sizes, input_split_sizes, *a, **k)

    dist.all_to_all_single = checked
    try:
        for k_case, (what, counts) in enumerate(DISPATCH_CASES[world]):
            note(what)
            where = f"rank {rank}, world {world}, {what}"
            x, dest = _dispatch_rows(counts, rank, k_case)
            send = counts[rank]
            recv = [counts[s][rank] for s in range(world)]
            sources = [_dispatch_rows(counts, s, k_case) for s in range(world)]
            want = torch.cat([xs[ds == rank] for xs, ds in sources])
            phase.update(now="dispatch", splits=(recv, send))
            try:
                res = mod.dispatch(x.clone(), dest.clone())
            except Exception as e:
                if len(x) == 0 and isinstance(e, IndexError):
                    return [f"{where}: {_describe(e, mod.__file__)}",
                            f"rank {rank} has no rows (x has shape {tuple(x.shape)}): there is "
                            "no x[0]; take the row shape from x.shape[1:]"]
                raise
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                return [f"{where}: dispatch returned {type(res).__name__}; it must return "
                        "(received, plan)"]
            received, plan = res
            if tuple(received.shape) != tuple(want.shape):
                return [f"{where}: received has shape {tuple(received.shape)}, expected "
                        f"{tuple(want.shape)} ({sum(recv)} rows arrive here: {recv} from ranks "
                        f"{list(range(world))})"]
            if not torch.equal(received, want):
                same_rows = sorted(map(tuple, received.tolist())) == \
                    sorted(map(tuple, want.tolist()))
                hint = " (the right rows, in another order: group them by source rank, each " \
                       "source's in its own order; sort by destination with stable=True)" \
                    if same_rows else ""
                return [f"{where}: received differs from the rows sent here (columns: source "
                        f"rank, row index there, value): {_first_diff(received, want)}{hint}"]
            phase.update(now="combine", splits=(send, recv))
            y = received * 10 + rank  # the "experts" of this rank
            out = mod.combine(y, plan)
            expect = x * 10 + dest[:, None].to(x.dtype)
            if tuple(out.shape) != tuple(expect.shape):
                return [f"{where}: combine returned shape {tuple(out.shape)}, expected "
                        f"{tuple(expect.shape)} (one row per row of x)"]
            if not torch.equal(out, expect):
                order = torch.argsort(dest, stable=True)
                if torch.equal(out, expect[order]):
                    return [f"{where}: the return trip did not restore the original order: the "
                            "rows came back grouped by destination rank; put each where it was "
                            "(out[order] = what came back, order the sort of dispatch)"]
                return [f"{where}: combine's row i is not the output for row i of x: "
                        f"{_first_diff(out, expect)}"]
    finally:
        dist.all_to_all_single = real
    return []
