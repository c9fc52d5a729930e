"""The AMP lab's DeepSpeed variant (``python -m labs.amp --impl deepspeed``): the same training
through DeepSpeed's fp16 engine, to record DeepSpeed's own loss-scale history next to ours.
Kept apart so that labs/amp.py reads as the algorithm and DeepSpeed is imported only here."""
from __future__ import annotations

import math

from labs.amp import AMP_TOLERANCE, MixedPrecision, _poison
from labs.core.model import ToyGPT, loss_fn
from labs.core.train import UsageError


class DeepSpeedFP16(MixedPrecision):
    """The same training through DeepSpeed's engine with ``fp16.enabled`` and dynamic loss
    scaling, to record DeepSpeed's own scale history on the same injected overflows. The engine
    keeps the model in fp16 and fp32 master weights in its optimizer. With ZeRO stage 1 or 2 it
    scales with hysteresis; DeepSpeed 0.19.8's stage-0 fp16 optimizers ignore ``hysteresis``."""

    def build(self) -> None:
        try:
            import deepspeed
        except ImportError:
            raise UsageError("--impl deepspeed needs DeepSpeed: pip install -c constraints.txt "
                             "-e '.[deepspeed]'") from None
        a = self.args
        if self.rt.distributed:
            deepspeed.init_distributed(dist_backend=self.rt.backend)
        self.tolerance = AMP_TOLERANCE["fp16-deepspeed"]
        model = ToyGPT(self.settings.model).to(self.rt.device)
        self.ds_config = {
            "train_batch_size": self.settings.batch_size,
            "train_micro_batch_size_per_gpu": self.settings.batch_size // self.rt.world_size,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {
                "lr": self.settings.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                "weight_decay": self.settings.weight_decay, "torch_adam": True}},
            "fp16": {"enabled": True, "loss_scale": 0,
                     "initial_scale_power": int(round(math.log2(a.init_scale))),
                     "loss_scale_window": a.growth_interval, "hysteresis": a.hysteresis,
                     "consecutive_hysteresis": a.consecutive_hysteresis, "min_loss_scale": 1},
            "zero_optimization": {"stage": a.ds_stage},
            "steps_per_print": 10**9,
        }
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.ds_config)
        self.extra["ds_config"] = self.ds_config

    def forward_backward(self, x, y):
        handle = None
        if self.step_index in self.inject and self.rt.rank == 0:
            handle = next(self.model.module.parameters()).register_hook(_poison)
        with self.meter.measure(self.model.parameters()):
            loss = loss_fn(self.model(x), y)
        self.model.backward(loss)  # DeepSpeed scales the loss itself
        if handle is not None:
            handle.remove()
        return loss.detach().float()

    def optimizer_step(self) -> None:
        before = self.model.skipped_steps
        self.model.step()
        self.history["loss_scale"].append(float(self.optimizer.loss_scale))
        if self.model.skipped_steps > before:
            self.history["skipped_steps"].append(self.step_index)
        self.history["overflowed_grads"].append(int(self.model.skipped_steps > before))
        self.step_index += 1

    def full_state(self):
        if not self.rt.is_main:
            return None
        return {n: p.detach().float().cpu() for n, p in self.model.module.named_parameters()}
