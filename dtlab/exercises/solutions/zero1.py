"""Reference solution: a ZeRO-1 AdamW (optimizer state sharded over the data-parallel ranks)."""
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
        grads = torch.zeros(self.per * self.world)
        grads[:self.numel] = torch.cat([p.grad.reshape(-1) for p in self.params])
        owned = torch.empty(self.per)
        dist.reduce_scatter_tensor(owned, grads)  # the sum of my slice's gradients
        self.shard.grad = owned / self.world
        self.inner.step()
        full = torch.empty(self.per * self.world)
        dist.all_gather_into_tensor(full, self.shard.detach())
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(full[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
