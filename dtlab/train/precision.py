"""Mixed precision bookkeeping shared by the AMP lab, its DeepSpeed variant and accelerate:
the tolerance each precision is held to, an injected gradient overflow, and the loss-scale
history every scaler records (with its picture).

Mixed precision is not bit-equal to fp32 by design: every op rounds to the low type's mantissa
(fp16: 10 bits, a relative step of 2^-10 between neighbours at 1.0; bf16: 7 bits, 2^-7) and the
errors compound over layers and steps. The bounds below sit about twice above the drift measured
on the tiny preset over 50 steps and far below the loss's own fall over such a run; docs/amp.md
has the measured figures and explains why DeepSpeed's fp16 engine drifts further.
"""
from __future__ import annotations


import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

AMP_TOLERANCE = {"fp16": {"loss_rel": 1e-2, "param_abs": 1.5e-2},
                 "fp16-master": {"loss_rel": 4e-2, "param_abs": 3e-2},
                 "fp16-deepspeed": {"loss_rel": 1.5e-1, "param_abs": 1e-1},
                 "bf16": {"loss_rel": 3e-2, "param_abs": 5e-2}}


def _poison(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[0] = float("inf")
    return grad


class ScaleHistory:
    """What a dynamic loss scaler did, step by step: the scale after each step, the steps it
    skipped, how many gradients overflowed; and the overflows injected on purpose
    (``--inject-overflow-at``) to watch it happen."""

    def __init__(self, inject_at=()):
        self.inject_at = set(inject_at)
        self.step = 0
        self.loss_scale: list[float] = []
        self.skipped_steps: list[int] = []
        self.overflowed_grads = 0

    def inject(self, param: torch.Tensor, rank: int):
        """When this step is one to overflow on rank 0, a hook that puts an inf into ``param``'s
        gradient; it runs before the gradient is accumulated, so under DDP the inf travels
        through the all-reduce like a real overflow. Returns the handle to remove, or None."""
        if self.step in self.inject_at and rank == 0:
            return param.register_hook(_poison)
        return None

    def record(self, scale: float, skipped: bool, overflowed: int) -> None:
        self.loss_scale.append(float(scale))
        if skipped:
            self.skipped_steps.append(self.step)
        self.overflowed_grads += overflowed
        self.step += 1

    def report(self, extra: dict, out: str | None, title: str) -> bool:
        """Into ``extra`` (the run record, from which ``dtlab run`` draws loss_scale.png: see
        dtlab/report/pictures.py; ``out`` is unused); True when the run stayed equivalent to the
        baseline (no step was skipped: the baseline took every step)."""
        extra.update(loss_scale=self.loss_scale, skipped_steps=self.skipped_steps,
                     overflowed_grads=self.overflowed_grads, loss_scale_title=title)
        return not self.skipped_steps

    def drift_reason(self) -> str:
        n = len(self.skipped_steps)
        return f"{n} step{'s' if n != 1 else ''} skipped" if n else ""


def loss_scale_rules(rules: str, hysteresis: int, growth_interval: int, backoff: float,
                     consecutive_hysteresis: bool = False) -> dict:
    """``extra.loss_scale_rules``: whose rules a scaler followed, for the loss-scale picture to
    say why an overflow did or did not back the scale off."""
    return {"rules": rules, "hysteresis": int(hysteresis), "growth_interval": int(growth_interval),
            "backoff": float(backoff), "consecutive_hysteresis": bool(consecutive_hysteresis)}


def deepspeed_fp16_unsupported(device_type: str) -> str | None:
    """Why DeepSpeed's fp16 engine cannot run on this device, or None. On the CPU, DeepSpeed's
    accelerator offers fp16 only where oneDNN has fp16 kernels (AVX512-FP16 or AMX-FP16, recent
    Intel server CPUs) and otherwise stops at start-up with "Type fp16 is not supported on your
    device"; our own fp16 autocast runs everywhere."""
    if device_type != "cpu":
        return None
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        ok = False
    if ok:
        return None
    return ("DeepSpeed's fp16 engine on the CPU needs oneDNN fp16 kernels (AVX512-FP16 or "
            "AMX-FP16), which this CPU lacks (torch.ops.mkldnn._is_mkldnn_fp16_supported() is "
            "False); DeepSpeed's own scaling rules run here as --scaler own --rules deepspeed, "
            "and the engine runs on a GPU")
