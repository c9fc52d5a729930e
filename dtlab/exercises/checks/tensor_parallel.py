"""The check of the tensor_parallel exercise: column- and row-parallel linear layers against the full layer."""
from __future__ import annotations

from dtlab.exercises.checks.common import _first_diff, _quiet


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    import torch.distributed as dist
    g = torch.Generator().manual_seed(0)
    hidden, batch = 8, 5
    x = torch.randn(batch, hidden, generator=g)
    w1, b1 = torch.randn(4 * hidden, hidden, generator=g), torch.randn(4 * hidden, generator=g)
    w2, b2 = torch.randn(hidden, 4 * hidden, generator=g), torch.randn(hidden, generator=g)
    h_full = x @ w1.T + b1
    per = 4 * hidden // world
    h = mod.column_parallel_forward(x, w1, b1, rank, world)
    expected_h = h_full[:, rank * per:(rank + 1) * per]
    if tuple(h.shape) != tuple(expected_h.shape):
        return [f"rank {rank}, world {world}: column_parallel_forward returned shape "
                f"{tuple(h.shape)}, expected {tuple(expected_h.shape)} (this rank's {per} of "
                f"{4 * hidden} output features)"]
    if not torch.allclose(h, expected_h, atol=1e-5):
        return [f"rank {rank}, world {world}: column_parallel_forward differs from columns "
                f"{rank * per}..{(rank + 1) * per - 1} of the full layer's output: "
                f"{_first_diff(h, expected_h)}"]
    act = torch.nn.functional.gelu(expected_h)
    calls = []
    real = dist.all_reduce

    def counting(t, *a, **k):
        calls.append(t.numel())
        return real(t, *a, **k)
    dist.all_reduce = counting
    try:
        y = mod.row_parallel_forward(act, w2, b2, rank, world)
    finally:
        dist.all_reduce = real
    expected_y = torch.nn.functional.gelu(h_full) @ w2.T + b2
    if tuple(y.shape) != tuple(expected_y.shape):
        return [f"rank {rank}, world {world}: row_parallel_forward returned shape "
                f"{tuple(y.shape)}, expected {tuple(expected_y.shape)}"]
    if not torch.allclose(y, expected_y, atol=1e-4):
        return [f"rank {rank}, world {world}: row_parallel_forward differs from the full MLP: "
                f"{_first_diff(y, expected_y)}"]
    if len(calls) != 1:
        return [f"rank {rank}: row_parallel_forward made {len(calls)} all-reduces; one is "
                "enough (of the partial products)"]
    return []
