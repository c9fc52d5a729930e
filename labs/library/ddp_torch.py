"""The DDP lab's library variant (``python -m labs.ddp --impl torch``, the default): torch's
DistributedDataParallel on the same model, data and optimizer, its all-reduce routed through a
communication hook that does what DDP's default does and counts every bucket. Kept apart so that
labs/ddp.py reads as the machinery written out."""
from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel as DDP

from dtlab.measure.comm_counter import counting_allreduce_hook
from dtlab.train.loop import Strategy


class TorchDDP(Strategy):
    name, variant = "ddp", "torch"

    def __init__(self, rt, settings, bucket_mb: float = 25.0):
        super().__init__(rt, settings)
        self.bucket_mb = bucket_mb

    def build(self) -> None:
        super().build()  # the plain model and its optimizer (DDP shares the parameters)
        if self.rt.distributed:
            device_ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=device_ids, bucket_cap_mb=self.bucket_mb)
            self.model.register_comm_hook(None, counting_allreduce_hook(self.comm))
        self.extra["bucket_mb"] = self.bucket_mb
