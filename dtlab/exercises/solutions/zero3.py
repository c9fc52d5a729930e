"""Reference solution: ZeRO-3's gather and free hooks, as labs/zero.py's stage 3 does them."""
import math

import torch
import torch.distributed as dist


class Unit:
    """One layer: its parameters are views of one flat vector (padded to a multiple of W) that
    has memory only while gathered; the rank keeps its own shard of it apart."""

    def __init__(self, module: torch.nn.Module, rank: int, world: int):
        self.module, self.params = module, list(module.parameters())
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.per = math.ceil(self.numel / world)
        self.full = torch.zeros(self.per * world, dtype=self.params[0].dtype)
        with torch.no_grad():
            self.full[:self.numel] = torch.cat([p.reshape(-1) for p in self.params])
        for p, view in zip(self.params, self.full[:self.numel].split(self.sizes)):
            p.data = view.view_as(p)  # the layer's parameters become views of the flat vector
        self.shard = self.full[rank * self.per:(rank + 1) * self.per].clone()
        self.full.untyped_storage().resize_(0)  # not gathered until the layer runs
        self.grad = None   # this rank's shard of the averaged gradient, after backward
        self.ready = 0

    def is_gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0


class ZeRO3:
    def __init__(self, model: torch.nn.Module):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.units = [Unit(m, self.rank, self.world) for m in model.children()
                      if list(m.parameters())]
        for u in self.units:
            self.register(u)
            for p in u.params:
                p.register_post_accumulate_grad_hook(lambda p, u=u: self._grad_ready(u))

    def _grad_ready(self, u: Unit) -> None:
        """Backward is done with the layer: my shard of the averaged gradient, then free."""
        u.ready += 1
        if u.ready < len(u.params):
            return
        u.ready = 0
        flat = torch.zeros(u.full.numel(), dtype=u.full.dtype)
        flat[:u.numel] = torch.cat([p.grad.reshape(-1) for p in u.params])
        owned = torch.empty(u.per, dtype=flat.dtype)
        dist.reduce_scatter_tensor(owned, flat)
        u.grad = owned / self.world
        for p in u.params:
            p.grad = None
        self.free(u)

    def gather(self, u: Unit) -> None:
        if u.is_gathered():
            return
        u.full.untyped_storage().resize_(u.full.numel() * u.full.element_size())
        dist.all_gather_into_tensor(u.full, u.shard)  # rank r's shard at [r per, (r+1) per)

    def free(self, u: Unit) -> None:
        # Resized in place: the views autograd saved for backward see the memory come back.
        u.full.untyped_storage().resize_(0)

    def register(self, u: Unit) -> None:
        def after(module, args, out):
            if torch.is_grad_enabled() and out.requires_grad:  # its backward needs them again
                out.register_hook(lambda grad: self.gather(u))
            self.free(u)  # the layer has run
        u.module.register_forward_pre_hook(lambda module, args: self.gather(u))
        u.module.register_forward_hook(after)
