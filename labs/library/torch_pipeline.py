"""The pipeline lab's library variant (``python -m labs.pipeline --impl torch``): the same
stages as labs/pipeline.py (its chunks, their layout in the record and in checkpoints) run by
``torch.distributed.pipelining``'s schedules instead of our action lists. Kept apart so that
labs/pipeline.py reads as our schedules alone."""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.distributed.pipelining as pipelining

from dtlab.measure.comm_counter import library_collectives
from dtlab.train.model import loss_fn
from labs.pipeline import Pipeline


class TorchPipeline(Pipeline):
    impl = "torch"
    # our schedule -> torch.distributed.pipelining's class (interleaved: V stages a rank)
    TORCH = MappingProxyType({"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                              "interleaved": "ScheduleInterleaved1F1B",
                              "zbh1": "ScheduleInterleavedZeroBubble"})

    def build(self) -> None:
        super().build()
        r, p, v = self.grid.p, self.grid.pp, self.v
        stages = [pipelining.PipelineStage(st.module, c * p + r, p * v, self.rt.device)
                  for c, st in enumerate(self.chunks)]
        cls = getattr(pipelining, self.TORCH[self.schedule_name])
        # loss per micro-batch; the schedule divides the gradients by M (scale_grads). The
        # multi-stage classes (interleaved, zero bubble) take a list of stages even at V = 1.
        self.sched = cls(stages if v > 1 or self.schedule_name in ("interleaved", "zbh1")
                         else stages[0], n_microbatches=self.m, loss_fn=loss_fn)
        self.extra.update(torch_schedule=self.TORCH[self.schedule_name])

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        first, last = self.grid.p == 0, self.grid.p == self.grid.pp - 1
        losses: list[torch.Tensor] = []
        # Saved tensors of the whole step: an upper bound on the live activations here, since
        # torch's schedule frees each micro-batch's after its backward.
        with self.meter.measure(self.model.parameters()), library_collectives(self.comm):
            if first:
                self.sched.step(x)
            elif last:
                self.sched.step(target=y, losses=losses)
            else:
                self.sched.step()
        if last:
            return torch.stack(losses).mean().detach()
        return torch.zeros((), device=self.rt.device)
