"""The check of the ring_allreduce exercise: the ring all-reduce from isend/irecv."""
from __future__ import annotations

from dtlab.exercises.checks.common import _first_diff, _quiet


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    out = []
    for n in (1, 2, 3, 7, 64, 1001):
        note(f"size {n}")
        x = (torch.arange(n) % 13 + 100 * rank).float()
        expected = (torch.arange(n) % 13).float() * world + 100 * sum(range(world))
        res = mod.ring_all_reduce(x)
        got = x if res is None else res
        if got.shape != expected.shape:
            out.append(f"rank {rank}, world {world}, size {n}: returned shape "
                       f"{tuple(got.shape)}, expected {tuple(expected.shape)}")
        elif not torch.equal(got, expected):
            out.append(f"rank {rank}, world {world}, size {n}: {_first_diff(got, expected)}")
        if out:
            break
    return out
