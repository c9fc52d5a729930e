"""The check of the zero1 exercise: a ZeRO-1 AdamW against torch's AdamW."""
from __future__ import annotations

import math

from dtlab.exercises.checks.common import _first_diff, _quiet


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    shapes = [(5, 3), (7,), (4, 4)]
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g) for s in shapes]
    mine = [t.clone() for t in init]
    ref = [t.clone().requires_grad_(True) for t in init]
    # A large eps: Adam divides by sqrt(v) + eps, so with a tiny eps a gradient summed instead
    # of averaged over ranks gives almost the same step; with eps ~ |g| it does not.
    opt = mod.ZeRO1AdamW(mine, lr=0.05, betas=(0.9, 0.95), eps=0.5)
    ref_opt = torch.optim.AdamW(ref, lr=0.05, betas=(0.9, 0.95), eps=0.5, weight_decay=0.0)
    for step in range(3):
        grads = [[torch.randn(s, generator=torch.Generator().manual_seed(100 * step + r + 7 * i))
                  for i, s in enumerate(shapes)] for r in range(world)]
        for p, gr in zip(mine, grads[rank]):
            p.grad = gr.clone()
        for i, p in enumerate(ref):
            p.grad = sum(grads[r][i] for r in range(world)) / world
        opt.step()
        ref_opt.step()
        for i, (a, b) in enumerate(zip(mine, ref)):
            if not torch.allclose(a, b.detach(), atol=1e-6, rtol=1e-5):
                return [f"rank {rank}, world {world}, step {step}, parameter {i} (shape "
                        f"{shapes[i]}): {_first_diff(a.reshape(-1), b.detach().reshape(-1))} "
                        "(torch AdamW on one process, averaged gradients)"]
    total = sum(math.prod(s) for s in shapes)
    inner = getattr(opt, "inner", None)
    held = sum(t.numel() for st in (inner.state.values() if inner else [])
               for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    if held > 2 * (math.ceil(total / world) + world):
        return [f"rank {rank}: self.inner holds Adam state for {held // 2} elements; ZeRO-1 "
                f"keeps about P/W = {total / world:.1f} (the optimizer state is not sharded)"]
    return []
