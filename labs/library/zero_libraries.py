"""The ZeRO lab's library variants (``python -m labs.zero --impl ...``): the same partitioning
done by FairScale and by torch's FSDP2, on the same model, data and optimizer, compared with the
same baseline. Kept apart so that labs/zero.py reads as the algorithm.

- ``fairscale-oss`` (stage 1): FairScale's ``OSS`` optimizer wrapper gives each rank the AdamW
  state of a subset of the parameters (whole tensors, assigned greedily by size, not slices of
  a flat vector as ours); gradients are all-reduced by torch DDP; after its step each rank
  broadcasts the parameters it owns.
- ``fairscale-sdp`` (stage 2): ``ShardedDataParallel`` with ``OSS``: each gradient is *reduced*
  to the rank that owns it (not all-reduced), and the others drop it.
- ``fsdp2`` (stage 3): ``torch.distributed.fsdp.fully_shard`` on every layer and on the model:
  parameters become DTensors sharded on dim 0; each layer's are all-gathered before its forward
  and backward and its gradients reduce-scattered, as in ours.

Library collectives are counted at the dispatcher (``dtlab.measure.comm_counter.library_collectives``), so the
bytes per step are what these libraries really issued.
"""
from __future__ import annotations

from types import MappingProxyType

from dtlab.measure import memory_meter as mem
from dtlab.measure.comm_counter import library_collectives
from dtlab.errors import UsageError
from dtlab.train.loop import Strategy



def _fairscale():
    try:
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim.oss import OSS
    except ImportError:
        raise UsageError("--impl fairscale-* needs FairScale: pip install -c constraints.txt "
                         "-e '.[fairscale]'") from None
    return OSS, ShardedDataParallel


class LibraryZeRO(Strategy):
    name = "zero"
    STAGES = MappingProxyType({"fairscale-oss": 1, "fairscale-sdp": 2, "fsdp2": 3})  # --impl -> ZeRO stage

    def __init__(self, rt, settings, impl: str):
        super().__init__(rt, settings)
        self.variant, self.stage = impl, self.STAGES[impl]
        self.extra.update(impl=impl, stage=self.stage)

    def build(self) -> None:
        import torch
        super().build()
        adamw = self.settings.adamw()
        if self.variant.startswith("fairscale"):
            OSS, ShardedDataParallel = _fairscale()
            self.optimizer = OSS(self.model.parameters(), optim=torch.optim.AdamW, **adamw)
            if self.variant == "fairscale-oss":
                from torch.nn.parallel import DistributedDataParallel as DDP
                self.model = DDP(self.model)
            else:
                self.model = ShardedDataParallel(self.model, self.optimizer, reduce_buffer_size=0)
            owned = self.optimizer.param_groups[0]["params"]
            self.extra["owned_params"] = sum(p.numel() for p in owned)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.rt.device.type, (self.rt.world_size,))
            for layer in self.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self.optimizer = self.make_optimizer(self.model.parameters())

    def forward_backward(self, x, y):
        with library_collectives(self.comm):  # the libraries' own all-gathers, reduces, ...
            return super().forward_backward(x, y)

    def optimizer_step(self) -> None:
        with library_collectives(self.comm):  # OSS broadcasts the updated parameters
            self.optimizer.step()

    def memory(self) -> dict:
        inner = getattr(self.optimizer, "optim", self.optimizer)  # OSS wraps the local AdamW
        return mem.snapshot(list(self.model.parameters()), inner, self.meter, self.rt.device)
