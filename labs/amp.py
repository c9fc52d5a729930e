"""AMP: autocast, dynamic loss scaling and fp32 master weights, ours beside torch's.

Mixed precision runs the big matrix multiplies in a 16-bit type (half the bytes, and on GPUs
several times the FLOP/s) and keeps what is sensitive in fp32.

- ``--dtype fp16|bf16`` runs forward and backward under ``torch.autocast`` on the run's device:
  matmuls and linear layers in the low type, softmax, layer norm and the loss in fp32 (autocast's
  op lists). The parameters stay fp32 ("master weights" for free).
- fp16 has a narrow range: gradients smaller than 2^-24 round to zero. ``--scaler own|torch``
  multiplies the loss by a large scale before backward so small gradients survive, divides them
  by it before the step, and adapts the scale: an inf/NaN in any gradient (on any rank) skips
  the step and multiplies the scale by ``--backoff-factor``; ``--growth-interval`` clean steps in
  a row multiply it by ``--growth-factor``. ``DynamicLossScaler`` below is that, written out;
  ``--scaler torch`` is ``torch.amp.GradScaler``; ``--rules deepspeed --hysteresis H`` follows
  DeepSpeed's fp16 engine instead, which backs off only once H overflows have been absorbed.
- ``--master-weights`` keeps the model itself in fp16 (pure half precision) and lets the optimizer
  step fp32 copies that are cast back after every step: updates smaller than half an fp16 ulp
  vanish when added to fp16 weights (``master_weights_demo`` in dtlab/costmodel/fp16.py).
- ``--inject-overflow-at 3,10`` puts an inf into one gradient at those steps so skipping and
  backing off can be watched on demand.

The record keeps the scale history, the skipped steps and ``extra.fp16_underflow`` (the last
step's gradients cast to fp16, with and without the scale). ``--impl deepspeed``: DeepSpeed's
fp16 engine, in labs/library/amp_deepspeed.py. Explained in docs/amp.md.

Run:
    python -m labs.amp --dtype fp16 --scaler own --inject-overflow-at 3,10 --steps 20
    torchrun --nproc_per_node=2 -m labs.amp --dtype bf16 --scaler none
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.costmodel import fp16
from dtlab.train.data import check_divisible
from dtlab.train.model import loss_fn
from dtlab.train.precision import AMP_TOLERANCE, DTYPES, ScaleHistory, loss_scale_rules
from dtlab.train.settings import finite
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


FP32_MAX = torch.finfo(torch.float32).max


class DynamicLossScaler:
    """Scale the loss, unscale the gradients, skip steps that overflowed, adapt the scale.

    ``rules="torch"`` follows torch.amp.GradScaler: back off on every overflow, grow after
    ``growth_interval`` clean steps in a row, unless the grown scale is not finite in fp32 (then
    it stays). ``rules="deepspeed"`` follows DeepSpeed's fp16 engine (which grows unchecked):
    an overflow only uses up one unit of ``hysteresis`` until a single one is left, then
    backs off (not below ``min_scale``); the scale grows once ``growth_interval`` clean steps have
    passed *after* the step that follows the last overflow, and every ``growth_interval`` steps
    after that; hysteresis is refilled when the scale grows, or after every clean step with
    ``consecutive_hysteresis``.
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, rules="torch", hysteresis=1,
                 consecutive_hysteresis=False, min_scale=1.0):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.rules = growth_interval, rules
        self.hysteresis, self.consecutive_hysteresis = hysteresis, consecutive_hysteresis
        self.min_scale = min_scale
        self.clean_steps = 0                 # clean steps since the last overflow
        self.hysteresis_left = hysteresis

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, params) -> bool:
        """Divide every gradient by the scale; True if any is inf/NaN on any rank."""
        grads = [p.grad for p in params if p.grad is not None]
        inv = 1.0 / self.scale
        found = torch.zeros(1, device=grads[0].device)
        for g in grads:
            g.mul_(inv)
            found += (~torch.isfinite(g)).any().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)  # one rank's overflow skips everywhere
        return bool(found.item() > 0)

    def update(self, overflow: bool) -> None:
        if self.rules == "torch":
            if overflow:
                self.scale *= self.backoff_factor
                self.clean_steps = 0
            else:
                self.clean_steps += 1
                if self.clean_steps == self.growth_interval:
                    grown = self.scale * self.growth_factor
                    # as GradScaler: past fp32's largest value every scaled loss is inf
                    if grown <= FP32_MAX:
                        self.scale = grown
                    self.clean_steps = 0
            return
        if overflow:  # DeepSpeed's rules
            if self.hysteresis_left <= 1:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            else:
                self.hysteresis_left -= 1
            self.clean_steps = 0
            return
        if self.consecutive_hysteresis:
            self.hysteresis_left = self.hysteresis
        stable = self.clean_steps  # clean steps before this one since the last overflow
        self.clean_steps += 1
        if stable > 0 and stable % self.growth_interval == 0:
            self.hysteresis_left = self.hysteresis
            self.scale *= self.growth_factor


class MixedPrecision(Strategy):
    name = "amp"

    def __init__(self, rt, settings, args):
        super().__init__(rt, settings)
        self.dtype_name, self.scaler_kind = args.dtype, args.scaler
        self.dtype = args.dtype + ("-master" if args.master_weights else "")
        self.variant = f"{args.dtype}-{args.scaler}" + ("-master" if args.master_weights else "") \
            + ("-dsrules" if args.rules == "deepspeed" and args.scaler == "own" else "")
        self.master_weights = args.master_weights
        if args.dtype != "fp32":
            self.tolerance = AMP_TOLERANCE[self.dtype]
        kw = dict(init_scale=args.init_scale, growth_factor=args.growth_factor,
                  backoff_factor=args.backoff_factor, growth_interval=args.growth_interval)
        if args.scaler == "own":
            self.scaler = DynamicLossScaler(rules=args.rules, hysteresis=args.hysteresis,
                                            consecutive_hysteresis=args.consecutive_hysteresis,
                                            **kw)
        elif args.scaler == "torch":
            self.scaler = torch.amp.GradScaler(rt.device.type, **kw)
        else:
            self.scaler = None
        self.history = ScaleHistory(args.inject_overflow_at)

    def build(self) -> None:
        super().build()
        if self.rt.distributed:  # data parallel across ranks: DDP, its traffic counted
            from torch.nn.parallel import DistributedDataParallel as DDP

            from dtlab.measure.comm_counter import counting_allreduce_hook
            self.model = DDP(self.model)
            self.model.register_comm_hook(None, counting_allreduce_hook(self.comm))
        if self.master_weights:
            # The model computes in fp16; the optimizer owns fp32 copies of its weights.
            self.net = getattr(self.model, "module", self.model)
            self.master = [p.detach().clone().float().requires_grad_(True)
                           for p in self.net.parameters()]
            self.net.half()
            self.optimizer = self.make_optimizer(self.master)

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        autocast = self.dtype_name != "fp32" and not self.master_weights
        with self.meter.measure(self.model.parameters()), \
                torch.autocast(self.rt.device.type, dtype=DTYPES[self.dtype_name],
                               enabled=autocast):
            loss = loss_fn(self.model(x), y)
        handle = self.history.inject(next(self.model.parameters()), self.rt.rank)
        if self.scaler_kind == "torch":
            self.scaler.scale(loss).backward()
        elif self.scaler_kind == "own":
            self.scaler.scale_loss(loss).backward()
        else:
            loss.backward()
        if handle is not None:
            handle.remove()
        return loss.detach().float()

    def optimizer_step(self) -> None:
        params = list(self.model.parameters())
        overflowed = sum(int((~torch.isfinite(p.grad)).any()) for p in params
                         if p.grad is not None)
        if self.master_weights:  # fp16 gradients -> the fp32 master copies
            for m, p in zip(self.master, params):
                m.grad = p.grad.float()
            params = self.master
        if self.scaler_kind == "torch":
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # unscales, skips the step on inf/NaN
            self.scaler.update()
            scale = self.scaler.get_scale()
            skipped = scale < before           # GradScaler backs off exactly when it skipped
        elif self.scaler_kind == "own":
            overflow = self.scaler.unscale_(params)
            if not overflow:
                self.optimizer.step()
            self.scaler.update(overflow)
            skipped, scale = overflow, self.scaler.scale
        else:
            self.optimizer.step()
            skipped, scale = False, 1.0
        if self.master_weights and not skipped:
            with torch.no_grad():
                for m, p in zip(self.master, self.net.parameters()):
                    p.copy_(m)  # cast the updated fp32 weights back to fp16
        self.history.record(scale, skipped, overflowed)

    def full_state(self):
        if not self.rt.is_main:
            return None
        if self.master_weights:
            names = [n for n, _ in self.net.named_parameters()]
            return {n: m.detach().cpu() for n, m in zip(names, self.master)}
        return super().full_state()

    def close(self) -> None:
        # A skipped step (injected or real overflow) is one the baseline took, so the two
        # trajectories part there by design: the drift is reported, not judged.
        self.equivalent = self.history.report(
            self.extra, self.settings.out if self.rt.is_main else None, self.variant)
        self.drift_reason = self.history.drift_reason()
        if self.scaler_kind == "own":  # the rules the loss-scale picture names
            s = self.scaler
            self.extra["loss_scale_rules"] = loss_scale_rules(
                s.rules, s.hysteresis if s.rules == "deepspeed" else 1, s.growth_interval,
                s.backoff_factor, s.consecutive_hysteresis)
        elif self.scaler_kind == "torch":
            self.extra["loss_scale_rules"] = loss_scale_rules(
                "torch", 1, self.scaler.get_growth_interval(), self.scaler.get_backoff_factor())
        grads = [p.grad for p in getattr(self, "master", None) or self.model.parameters()
                 if p.grad is not None]
        if grads:
            self.extra["fp16_underflow"] = fp16_underflow(torch.cat(
                [g.detach().float().reshape(-1) for g in grads]))
        super().close()


def fp16_underflow(grads: torch.Tensor, scale: float = 2.0**16) -> dict:
    """What casting the true (unscaled) fp32 gradients to fp16 does to them, with and without
    loss scaling: the shares that round to zero, that land among the subnormals (below
    2^-14, where precision drops bit by bit) and, scaled, that overflow."""
    g = grads[grads != 0].abs()
    share = lambda x: float(x.sum()) / max(1, g.numel())  # noqa: E731
    out = {"nonzero_gradients": int(g.numel()),
           "median_abs": float(g.median()) if g.numel() else 0.0, "scale": scale}
    for suffix, v in (("", g), ("_scaled", g * scale)):
        out[f"zero_in_fp16{suffix}"] = share(v.half() == 0)
        out[f"subnormal_in_fp16{suffix}"] = share((v < fp16.SMALLEST_NORMAL) & (v.half() != 0))
    out["overflow_in_fp16_scaled"] = share(torch.isinf((g * scale).half()))
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.amp", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", "deepspeed"],
                   help="own: autocast + --scaler; deepspeed: DeepSpeed's fp16 engine")
    p.add_argument("--ds-stage", type=int, default=1, choices=[0, 1, 2],
                   help="--impl deepspeed: ZeRO stage of the engine (default 1)")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--scaler", default="own", choices=["own", "torch", "none"])
    p.add_argument("--master-weights", action="store_true",
                   help="model in fp16, optimizer on fp32 copies (pure fp16 training)")
    p.add_argument("--init-scale", type=finite, default=2.0**16,
                   help="the loss scale at the first step (default 2^16, as GradScaler's)")
    p.add_argument("--growth-factor", type=finite, default=2.0,
                   help="scale multiplier after --growth-interval clean steps (default 2)")
    p.add_argument("--backoff-factor", type=finite, default=0.5,
                   help="scale multiplier on an overflow (default 0.5)")
    p.add_argument("--growth-interval", type=int, default=2000,
                   help="clean steps in a row before the scale grows (default 2000)")
    p.add_argument("--rules", default="torch", choices=["torch", "deepspeed"],
                   help="--scaler own: whose scale-update rules to follow (default torch)")
    p.add_argument("--hysteresis", type=int, default=1,
                   help="--rules deepspeed: overflows tolerated before backing off")
    p.add_argument("--consecutive-hysteresis", action="store_true",
                   help="--rules deepspeed: refill hysteresis after every clean step")
    p.add_argument("--inject-overflow-at", type=step_list, default=[],
                   help="comma-separated steps (from 0) at which one gradient is set to inf")
    return add_common_args(p)


def step_list(text: str) -> list[int]:
    """'3,10' -> [3, 10] (argparse reports a ValueError as an invalid value of the flag)."""
    steps = [int(t) for t in text.split(",") if t.strip()]
    if any(k < 0 for k in steps):
        raise ValueError(text)
    return steps


step_list.__name__ = "list of steps"  # what argparse names in its error message


def check_args(args, settings, world: int) -> None:
    check_divisible(settings.batch_size, world)
    if args.init_scale <= 0 or args.growth_factor < 1 or not 0 < args.backoff_factor < 1:
        raise UsageError("--init-scale must be > 0, --growth-factor >= 1 and --backoff-factor "
                         "in (0, 1)")
    if args.growth_interval < 1 or args.hysteresis < 1:
        raise UsageError("--growth-interval and --hysteresis must be >= 1")
    if args.impl != "own":  # what the library variant can take: labs/library/amp_deepspeed.py
        return registry.get("amp").library_strategy(args.impl).check_args(args)
    if (args.hysteresis != 1 or args.consecutive_hysteresis) and \
            (args.scaler != "own" or args.rules != "deepspeed"):
        raise UsageError("--hysteresis and --consecutive-hysteresis follow DeepSpeed's rules; "
                         "add --scaler own --rules deepspeed")
    if args.master_weights and (args.dtype != "fp16" or args.scaler == "torch"):
        raise UsageError("--master-weights means a pure fp16 model: use --dtype fp16 with "
                         "--scaler own or none")
    if args.scaler != "none" and args.dtype == "fp32":
        raise UsageError("loss scaling is for fp16 (and harmless but pointless in bf16); with "
                         "--dtype fp32 use --scaler none")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl != "own":
        return registry.get("amp").library_strategy(args.impl)(rt, settings, args)
    return MixedPrecision(rt, settings, args)


def main(argv=None) -> int:
    return run_lab(registry.get("amp"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
