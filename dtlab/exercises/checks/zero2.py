"""The check of the zero2 exercise: a ZeRO-2 AdamW against torch's AdamW on the averaged
gradients, and the gradient shard each rank keeps."""
from __future__ import annotations

import math

from dtlab.exercises.checks.common import _first_diff, _quiet

Z2_RTOL, Z2_ATOL = 1e-9, 1e-12   # float64


def _z2_model():
    import torch
    torch.manual_seed(0)  # layers of 25, 36 and 14 numbers
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6),
                               torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def _batch(step: int, r: int):
    import torch
    g = torch.Generator().manual_seed(100 * step + r)
    return (torch.randn(3, 4, generator=g, dtype=torch.float64),
            torch.randn(3, 2, generator=g, dtype=torch.float64))


def _close(a, b) -> bool:
    import torch
    return tuple(a.shape) == tuple(b.shape) and torch.allclose(a, b, rtol=Z2_RTOL, atol=Z2_ATOL)


def _shard_problem(got, avg, numel: int, rank: int, world: int) -> str:
    """What is wrong with the gradient shard a rank kept of one unit ('' if nothing)."""
    import torch
    per = math.ceil(numel / world)
    padded = torch.cat([avg, avg.new_zeros(per * world - numel)])
    want = padded[rank * per:(rank + 1) * per]
    if not isinstance(got, torch.Tensor):
        return f"reduce_unit returned {type(got).__name__}, expected a tensor of {per} elements"
    if got.numel() != per:
        if got.numel() in (numel, per * world):
            return (f"this rank kept a gradient of {got.numel()} elements, the whole unit; "
                    f"ZeRO-2 keeps only its shard of {per} (ceil({numel}/{world})): "
                    "reduce-scatter, not all-reduce")
        return f"reduce_unit returned {got.numel()} elements; this rank's shard has {per}"
    got = got.reshape(-1)
    if _close(got, want):
        return ""
    if _close(got, want * world):
        return (f"the gradients were summed, not averaged: {_first_diff(got, want)}; "
                f"reduce_scatter sums over the ranks, divide by the world size ({world})")
    ext = torch.cat([avg.new_zeros(per * world), padded, avg.new_zeros(per * world)])
    for lo in range(-per * world, per * world + 1):
        if lo != rank * per and _close(got, ext[lo + per * world:lo + per * world + per]):
            return (f"this rank's gradient shard holds elements [{lo}, {lo + per}) of the "
                    f"unit's flat averaged gradient, but rank {rank} owns [{rank * per}, "
                    f"{(rank + 1) * per}): lay the gradients end to end from element 0, the "
                    "padding at the end, as the parameters are")
    return f"the gradient shard differs from this rank's slice of the averaged gradient: " \
           f"{_first_diff(got, want)}"


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import copy

    import torch
    import torch.nn.functional as F
    model = _z2_model()
    ref = copy.deepcopy(model)
    layers = [(k, m) for k, m in enumerate(model) if list(m.parameters())]
    names = [n for n, _ in model.named_parameters()]
    kept: dict = {}

    class Watched(mod.ZeRO2AdamW):
        def reduce_unit(self, i):
            out = super().reduce_unit(i)
            kept[i] = out.detach().clone() if isinstance(out, torch.Tensor) else out
            return out
    # A large eps: Adam divides by sqrt(v) + eps, so with a tiny eps a gradient summed instead
    # of averaged over the ranks gives almost the same step; with eps ~ |g| it does not.
    opt = Watched([list(m.parameters()) for _, m in layers], lr=0.05, betas=(0.9, 0.95),
                  eps=0.5)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, betas=(0.9, 0.95), eps=0.5,
                                weight_decay=0.0)
    for step in range(3):
        where = f"rank {rank}, world {world}, step {step}"
        note(f"step {step}")
        kept.clear()
        x, y = _batch(step, rank)
        error = None
        try:
            F.mse_loss(model(x), y).backward()
        except RuntimeError as e:  # e.g. a shard of the wrong size assigned as .grad
            error = e
        ref_opt.zero_grad(set_to_none=True)
        for r in range(world):
            xr, yr = _batch(step, r)
            F.mse_loss(ref(xr), yr).div(world).backward()
        for i, (k, m) in enumerate(layers):
            refs = [dict(ref.named_parameters())[f"{k}.{n}"] for n, _ in m.named_parameters()]
            avg = torch.cat([q.grad.reshape(-1) for q in refs])
            if i not in kept:
                continue
            problem = _shard_problem(kept[i], avg, avg.numel(), rank, world)
            if problem:
                return [f"{where}: unit {i} (layer {k}, {avg.numel()} numbers): {problem}"]
        if error is not None:
            raise error
        if len(kept) != len(layers):
            return [f"{where}: reduce_unit ran for units {sorted(kept)} of {len(layers)}"]
        left = [n for n, p in model.named_parameters() if p.grad is not None]
        if left:
            return [f"{where}: after backward, {left[0]}.grad still holds the full gradient; "
                    "ZeRO-2 keeps only this rank's shard of the averaged gradient: set p.grad = "
                    "None once its unit is reduce-scattered"]
        opt.step()
        ref_opt.step()
        for n, a, b in zip(names, model.parameters(), ref.parameters()):
            if not _close(a.detach(), b.detach()):
                return [f"{where}: after the step, {n} differs from torch AdamW's on one process "
                        f"with the averaged gradients: "
                        f"{_first_diff(a.detach().reshape(-1), b.detach().reshape(-1))}"]
    return []
