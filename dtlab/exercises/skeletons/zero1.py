"""Exercise: a ZeRO-1 optimizer (docs/zero.md, labs/zero.py).

Plain data parallelism keeps the whole AdamW state (2 fp32 numbers per parameter) on every rank.
ZeRO-1 cuts it into W slices: each rank keeps the state of its own slice of the (flattened)
parameters, updates only that slice, and the ranks all-gather the updated slices.

Write ``ZeRO1AdamW.step``. When it is called, every ``p.grad`` holds this rank's LOCAL gradient
(from its own part of the batch), so the step must also average gradients over the ranks.

    dtlab check zero1 --impl zero1.py

The checker trains a few tensors (sizes that do not divide by W) for 3 steps on 2 and 3
processes and compares them with torch's AdamW on one process with the averaged gradients; it
also counts the Adam state your ``self.inner`` optimizer holds: about 2 x P / W numbers.

Hints
- ``__init__`` below already builds this rank's slice (``self.shard``, padded flat layout) and an
  AdamW over it (``self.inner``).
- In ``step``: flatten the gradients into a padded buffer, ``dist.reduce_scatter_tensor`` gives
  the sum of YOUR slice; divide by W; set ``self.shard.grad``; ``self.inner.step()``;
  ``dist.all_gather_into_tensor`` the slices; copy back into the parameters.
"""
import math

import torch
import torch.distributed as dist


class ZeRO1AdamW:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.numel = sum(p.numel() for p in self.params)
        self.per = math.ceil(self.numel / self.world)
        flat = torch.zeros(self.per * self.world)
        flat[:self.numel] = torch.cat([p.detach().reshape(-1) for p in self.params])
        lo = self.rank * self.per
        self.shard = flat[lo:lo + self.per].clone().requires_grad_(True)
        self.inner = torch.optim.AdamW([self.shard], lr=lr, betas=betas, eps=eps,
                                       weight_decay=weight_decay)

    def step(self):
        # TODO 1: the averaged gradient of my slice (reduce-scatter, then / world)
        # TODO 2: step my slice with self.inner
        # TODO 3: all-gather every slice and copy the result into self.params
        raise NotImplementedError("TODO: ZeRO1AdamW.step (reduce-scatter, step the slice, "
                                  "all-gather)")
