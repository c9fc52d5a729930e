"""The AMP lab's DeepSpeed variant (``python -m labs.amp --impl deepspeed``): the same training
through DeepSpeed's fp16 engine, to record DeepSpeed's own loss-scale history next to ours.
Kept apart so that labs/amp.py reads as the algorithm and DeepSpeed is imported only here; it
shares nothing with labs/amp.py but what dtlab/train/precision.py holds for both."""
from __future__ import annotations

import math

from dtlab.errors import UsageError
from dtlab.train.model import ToyGPT, loss_fn
from dtlab.train.precision import (AMP_TOLERANCE, ScaleHistory, deepspeed_fp16_unsupported,
                                   loss_scale_rules)
from dtlab.train.runtime import choose_backend_device
from dtlab.train.settings import ADAMW_BETAS
from dtlab.train.loop import Strategy


class DeepSpeedFP16(Strategy):
    """DeepSpeed's engine with ``fp16.enabled`` and dynamic loss scaling, on the same injected
    overflows as our scaler. The engine keeps the model in fp16 and fp32 master weights in its
    optimizer. With ZeRO stage 1 or 2 it scales with hysteresis; DeepSpeed 0.19.8's stage-0 fp16
    optimizers ignore ``hysteresis``."""

    name, variant, dtype = "amp", "fp16-deepspeed-master", "fp16-master"
    tolerance = AMP_TOLERANCE["fp16-deepspeed"]

    def __init__(self, rt, settings, args):
        super().__init__(rt, settings)
        self.stage, self.init_scale = args.ds_stage, args.init_scale
        self.growth_interval, self.hysteresis = args.growth_interval, args.hysteresis
        self.consecutive_hysteresis = args.consecutive_hysteresis
        self.history = ScaleHistory(args.inject_overflow_at)

    @staticmethod
    def check_args(args) -> None:
        """labs/amp.py's flags this engine can take (checked before anything starts)."""
        if args.dtype != "fp16" or args.master_weights:
            raise UsageError("--impl deepspeed runs DeepSpeed's fp16 engine: use --dtype fp16 "
                             "(it keeps fp32 master weights itself)")
        if args.init_scale != 2 ** round(math.log2(args.init_scale)):
            raise UsageError("--impl deepspeed: --init-scale must be a power of 2 "
                             "(DeepSpeed takes initial_scale_power)")
        _, device = choose_backend_device(args.backend, args.device, 0)
        if (why := deepspeed_fp16_unsupported(device.type)):
            raise UsageError(f"--impl deepspeed: {why}")

    def build(self) -> None:
        try:
            import deepspeed
        except ImportError:
            raise UsageError("--impl deepspeed needs DeepSpeed: pip install -c constraints.txt "
                             "-e '.[deepspeed]'") from None
        if self.rt.distributed:
            deepspeed.init_distributed(dist_backend=self.rt.backend)
        s = self.settings
        model = ToyGPT(s.model).to(self.rt.device)
        self.ds_config = {
            "train_batch_size": s.batch_size,
            "train_micro_batch_size_per_gpu": s.batch_size // self.rt.world_size,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {
                "lr": s.lr, "betas": list(ADAMW_BETAS), "eps": 1e-8,
                "weight_decay": s.weight_decay, "torch_adam": True}},
            "fp16": {"enabled": True, "loss_scale": 0,
                     "initial_scale_power": int(round(math.log2(self.init_scale))),
                     "loss_scale_window": self.growth_interval, "hysteresis": self.hysteresis,
                     "consecutive_hysteresis": self.consecutive_hysteresis, "min_loss_scale": 1},
            "zero_optimization": {"stage": self.stage},
            "steps_per_print": 10**9,
        }
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.ds_config)
        self.extra["ds_config"] = self.ds_config

    def forward_backward(self, x, y):
        handle = self.history.inject(next(self.model.module.parameters()), self.rt.rank)
        with self.meter.measure(self.model.parameters()):
            loss = loss_fn(self.model(x), y)
        self.model.backward(loss)  # DeepSpeed scales the loss itself
        if handle is not None:
            handle.remove()
        return loss.detach().float()

    def optimizer_step(self) -> None:
        before = self.model.skipped_steps
        self.model.step()
        skipped = self.model.skipped_steps > before
        self.history.record(float(self.optimizer.loss_scale), skipped, int(skipped))

    def full_state(self):
        if not self.rt.is_main:
            return None
        return {n: p.detach().float().cpu() for n, p in self.model.module.named_parameters()}

    def close(self) -> None:
        self.equivalent = self.history.report(
            self.extra, self.settings.out if self.rt.is_main else None, self.variant)
        self.drift_reason = self.history.drift_reason()
        self.extra["loss_scale_rules"] = loss_scale_rules(
            "deepspeed", self.hysteresis, self.growth_interval, 0.5, self.consecutive_hysteresis)
        super().close()
