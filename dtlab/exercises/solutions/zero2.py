"""Reference solution: a ZeRO-2 AdamW (gradients and optimizer state sharded over the ranks);
each layer's gradients reduce-scattered as soon as backward has produced them, as labs/zero.py's
stage 2 does."""
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
        u, numel, per = self.units[i], self.numels[i], self.pers[i]
        grads = torch.zeros(per * self.world, dtype=u[0].dtype)
        grads[:numel] = torch.cat([p.grad.reshape(-1) for p in u])
        owned = torch.empty(per, dtype=grads.dtype)
        dist.reduce_scatter_tensor(owned, grads)  # the sum of my shard's gradients
        for p in u:
            p.grad = None  # the full gradient is not kept: ZeRO-2's saving
        return owned / self.world

    def step(self) -> None:
        self.inner.step()
        for u, shard, per in zip(self.units, self.shards, self.pers):
            full = torch.empty(per * self.world, dtype=shard.dtype)
            dist.all_gather_into_tensor(full, shard.detach())
            offset = 0
            with torch.no_grad():
                for p in u:
                    p.copy_(full[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
