"""Exercise: a ZeRO-2 optimizer (docs/zero.md, labs/zero.py --stage 2).

ZeRO-1 shards the AdamW state but every rank still holds the whole gradient. ZeRO-2 shards the
gradients too: as soon as backward has produced a layer's gradients, they are reduce-scattered,
so each rank receives the sum of ITS shard only, and the full gradients are dropped. The step
updates the rank's shard of the parameters; an all-gather puts the layers back together.

Here every layer is one *unit*: its parameters laid end to end in one flat vector, padded with
zeros at the end to a multiple of W, and rank r owns elements [r per, (r+1) per) (per = ceil(numel
/ W)). ``__init__`` (given) builds this rank's parameter shards (``self.shards``), an AdamW over
them (``self.inner``) and a hook that calls ``self.reduce_unit(i)`` once backward has produced
every gradient of unit i; what it returns becomes ``self.shards[i].grad``.

Write ``reduce_unit`` and ``step``.

    dtlab check zero2 --impl zero2.py

The checker trains a 3-layer MLP (float64; layers of 25, 36 and 14 numbers, which 2 and 3 do not
all divide) for 3 steps on 2 and 3 processes, each rank on its own batch. After each backward it
compares the shard ``reduce_unit`` returned with this rank's slice of the averaged gradient
(relative tolerance 1e-9) and asserts its size (per elements, not the whole unit) and that no
full ``p.grad`` is left; after each step, every parameter against torch's AdamW on one process
with the averaged gradients.

Hints
- In reduce_unit: a zero buffer of per x W elements, the gradients laid end to end from element
  0 (``torch.cat`` of ``p.grad.reshape(-1)``); ``dist.reduce_scatter_tensor(owned, buffer)``
  leaves in ``owned`` (per elements) the SUM over the ranks of this rank's shard: divide by W.
  Then set every ``p.grad`` of the unit to None and return the shard.
- In step: ``self.inner.step()``; per unit, ``dist.all_gather_into_tensor`` of the shards (rank
  order), and copy the first numel elements back into the parameters (``torch.no_grad()``).
"""
import math

import torch
import torch.distributed as dist


class ZeRO2AdamW:
    def __init__(self, units, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        self.units = [list(u) for u in units]  # a unit: one layer's parameters, laid end to end
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.numels = [sum(p.numel() for p in u) for u in self.units]
        self.pers = [math.ceil(n / self.world) for n in self.numels]  # a shard, padding included
        self.shards = []
        for u, numel, per in zip(self.units, self.numels, self.pers):
            flat = torch.zeros(per * self.world, dtype=u[0].dtype)
            flat[:numel] = torch.cat([p.detach().reshape(-1) for p in u])
            lo = self.rank * per
            self.shards.append(flat[lo:lo + per].clone().requires_grad_(True))
        self.inner = torch.optim.AdamW(self.shards, lr=lr, betas=betas, eps=eps,
                                       weight_decay=weight_decay)
        self.ready = [0] * len(self.units)
        for i, u in enumerate(self.units):
            for p in u:
                p.register_post_accumulate_grad_hook(lambda p, i=i: self._ready(i))

    def _ready(self, i: int) -> None:
        self.ready[i] += 1
        if self.ready[i] == len(self.units[i]):  # backward is done with unit i
            self.ready[i] = 0
            self.shards[i].grad = self.reduce_unit(i)

    def reduce_unit(self, i: int) -> torch.Tensor:
        # TODO 1: unit i's gradients in a padded flat buffer, reduce-scattered: my shard's sum
        # TODO 2: divide by the world size; drop the full gradients (p.grad = None); return it
        raise NotImplementedError("TODO: ZeRO2AdamW.reduce_unit (reduce-scatter, average, free "
                                  "the full gradients)")

    def step(self) -> None:
        # TODO 3: step my shards with self.inner, all-gather every unit, copy into the params
        raise NotImplementedError("TODO: ZeRO2AdamW.step (step the shards, all-gather)")
