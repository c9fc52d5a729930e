"""Exercise: ZeRO-3's gather and free hooks (docs/zero.md, labs/zero.py --stage 3).

ZeRO-3 shards the parameters too: between uses a rank holds only its shard of each layer. Just
before a layer runs, the ranks all-gather its full parameters; right after, they are freed. The
backward of the layer needs them again: gathered once more when the gradient of the layer's
output arrives, then (given below) its gradients are reduce-scattered and they are freed again.

Each layer with parameters is a ``Unit`` (given): its parameters are views of one flat vector
``u.full`` (padded to a multiple of W, rank r's shard at [r per, (r+1) per)), whose memory is
given back and taken away by resizing its storage; ``u.shard`` is this rank's shard, kept apart.

Write ``gather(u)``, ``free(u)`` and ``register(u)`` (the hooks on the layer).

    dtlab check zero3 --impl zero3.py

The checker wraps a 3-layer MLP (float64) on 2 and 3 processes, each rank on its own batch, for
two forward/backward rounds. When each layer runs it checks that this layer is gathered with the
unsharded model's values (rank order) and every other layer is freed; after forward, that no
full parameter is alive (elements counted); it compares the output with the unsharded model's,
and each layer's ``u.grad`` with this rank's shard of the averaged gradient (tolerance 1e-9).

Hints
- gather: give the storage its memory back, ``u.full.untyped_storage().resize_(u.full.numel() *
  u.full.element_size())``, then ``dist.all_gather_into_tensor(u.full, u.shard)`` (rank order).
  Do nothing if it is gathered already (``u.is_gathered()``).
- free: ``u.full.untyped_storage().resize_(0)``. Resize in place: do not assign a new tensor,
  the views the layer's parameters and autograd hold must see the memory when it comes back.
- register: ``u.module.register_forward_pre_hook(...)`` gathers; ``register_forward_hook``'s
  function gets (module, args, out): free there, but first (if ``out.requires_grad``)
  ``out.register_hook(...)`` to gather again: it fires when the gradient of the layer's output
  is ready, just before the layer's own backward.
"""
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
        # TODO 1: unless gathered already: give u.full its memory back, all-gather the shards
        raise NotImplementedError("TODO: ZeRO3.gather (storage back, all-gather the shards)")

    def free(self, u: Unit) -> None:
        # TODO 2: take u.full's memory away (resize its storage to 0)
        raise NotImplementedError("TODO: ZeRO3.free (storage resized to 0)")

    def register(self, u: Unit) -> None:
        # TODO 3: a forward pre-hook that gathers; a forward hook that frees, after registering
        # a hook on the output that gathers again for backward
        raise NotImplementedError("TODO: ZeRO3.register (gather before the layer, free after, "
                                  "gather again for its backward)")
