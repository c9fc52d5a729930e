"""The check of the loss_scaler exercise: dynamic loss scaling, step by step against torch's own update."""
from __future__ import annotations

import random

from dtlab.exercises.checks.common import _quiet


def check(mod, rank: int, world: int, note=_quiet) -> list[str]:
    import torch
    rng = random.Random(0)
    patterns = [[False] * 7, [True] * 4, [False, False, True, False, False, False, False, True]]
    patterns += [[rng.random() < 0.3 for _ in range(40)] for _ in range(5)]
    for k, pattern in enumerate(patterns):
        interval = 3
        s = mod.DynamicLossScaler(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=interval)
        scale = torch.tensor([1024.0])
        tracker = torch.tensor([0], dtype=torch.int32)
        for step, overflow in enumerate(pattern):
            taken = s.update(overflow)
            torch._amp_update_scale_(scale, tracker, torch.tensor([float(overflow)]), 2.0, 0.5,
                                     interval)
            if float(s.scale) != scale.item():
                history = "".join("X" if o else "." for o in pattern[:step + 1])
                return [f"pattern {k} (growth_interval {interval}), step {step} "
                        f"(overflow={overflow}, history {history}): "
                        f"expected scale {scale.item():g}, got {float(s.scale):g}"]
            if taken is not None and bool(taken) == overflow:
                return [f"pattern {k}, step {step}: update returned {taken!r}; an overflowed step "
                        "must be skipped (False), a clean one taken (True)"]
    return []
