"""The tensor-parallel lab's library variant (``python -m labs.tensor_parallel --impl torch``):
the same Megatron plan applied by ``torch.distributed.tensor.parallel`` (DTensor) instead of our
layers. ``ColwiseParallel`` on q, k, v and the MLP's fc, ``RowwiseParallel`` on the two
projections, the LM head column parallel with its logits gathered (``Replicate``), so the loss is
the ordinary one rather than our vocabulary-parallel cross entropy. Kept apart so that
labs/tensor_parallel.py reads as the algorithm; explained in docs/tensor-parallel.md.

DTensor issues its collectives itself: ``CommDebugMode`` names them (recorded per step as
``dtensor_comm_counts_per_step``) and ``library_collectives`` counts their bytes at the
dispatcher. The parameters are DTensors under the baseline's names, so the default
``param_layout`` serves the record and the checkpoint (a DTensor is gathered whole when read).
"""
from __future__ import annotations

from dtlab.measure.comm_counter import library_collectives
from dtlab.train.loop import Strategy
from dtlab.train.model import ToyGPT, loss_fn


class TorchTensorParallel(Strategy):
    """The same plan through DTensor's parallelize_module."""

    name, variant = "tensor_parallel", "torch"
    whole_batch = True

    def build(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        tp = self.rt.world_size
        model = ToyGPT(self.settings.model).to(self.rt.device)
        mesh = init_device_mesh(self.rt.device.type, (tp,))
        plan = {}
        for i in range(1, len(model.layers) - 1):
            for name in ("q", "k", "v"):
                plan[f"layers.{i}.attn.{name}"] = ColwiseParallel()
            plan[f"layers.{i}.attn.proj"] = RowwiseParallel()
            plan[f"layers.{i}.mlp.fc"] = ColwiseParallel()
            plan[f"layers.{i}.mlp.proj"] = RowwiseParallel()
        plan[f"layers.{len(model.layers) - 1}.head"] = ColwiseParallel(
            output_layouts=Replicate())  # gather the logits; the loss is the ordinary one
        self.model = parallelize_module(model, mesh, plan)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.extra["tp"] = tp

    def forward_backward(self, x, y):
        from torch.distributed.tensor.debug import CommDebugMode
        self.optimizer.zero_grad(set_to_none=True)
        with CommDebugMode() as comm_mode, library_collectives(self.comm), \
                self.meter.measure(self.model.parameters()):
            loss = loss_fn(self.model(x), y)
            loss.backward()
        self.extra["dtensor_comm_counts_per_step"] = {
            str(op).split(".")[-1]: n for op, n in comm_mode.get_comm_counts().items()}
        return loss.detach()
