"""Hugging Face accelerate: one training loop, the parallelism chosen by the launcher's config.

``Accelerator`` reads how it was launched (the environment that ``accelerate launch`` or torchrun
set, plus the config file) and decides the rest: which device, whether to wrap the model in DDP, in
FSDP or in a DeepSpeed engine, the precision, gradient accumulation. The loop is written once:

    accelerator = Accelerator(gradient_accumulation_steps=K, mixed_precision="no")  # or bf16
    model, optimizer = accelerator.prepare(model, optimizer)
    for micro_batch in ...:
        with accelerator.accumulate(model):          # no gradient sync until the K-th
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)               # divides by K; scales for fp16
            optimizer.step()                         # a no-op until the K-th micro-batch
            optimizer.zero_grad()

This lab keeps the shared data split (each rank takes its rows of the same global batch) so the
run compares with the baseline; with a DataLoader, ``accelerator.prepare(loader)`` does the split.

Launching on CPU (found on this machine with accelerate 1.15.0; docs/launch.md has the why):
``accelerate launch --cpu --num_processes 2`` starts ONE process (``--cpu`` selects the simple
launcher, which only fans out through mpirun). What works is the multi-GPU launcher, which is
torchrun, with ``ACCELERATE_USE_CPU=1`` so the processes form a gloo group on the CPU
(``DistributedType.MULTI_CPU``); under plain torchrun the same variable is needed, else
accelerate stays single-process (``DistributedType.NO``). This lab sets it itself when there is no
GPU, and launchers/accelerate.sh and configs/accelerate_multi_cpu.yaml do the launch:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m labs.accelerate_lab
    launchers/accelerate.sh multi_cpu --steps 20
    launchers/accelerate.sh deepspeed --steps 20     # the DeepSpeed plugin (ZeRO-2), GPUs only
    dtlab run accelerate_lab --nproc 2 --accum 2

Explained in docs/launch.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from dtlab import registry
from dtlab.measure import memory_meter as mem
from dtlab.measure.comm_counter import library_collectives
from dtlab.train.data import check_divisible
from dtlab.train.model import loss_fn
from dtlab.train.precision import AMP_TOLERANCE
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


class AccelerateStrategy(Strategy):
    name = "accelerate_lab"

    def __init__(self, rt, settings, accum: int = 1, zero_stage: int | None = None,
                 mixed_precision: str = "no"):
        super().__init__(rt, settings)
        self.accum, self.zero_stage, self.mixed_precision = accum, zero_stage, mixed_precision
        if mixed_precision != "no":
            # autocast to 16 bits, fp32 weights; compared with the fp32 baseline at the AMP lab's
            # stated bound for that type (docs/amp.md explains it)
            self.dtype, self.tolerance = mixed_precision, AMP_TOLERANCE[mixed_precision]

    def build(self) -> None:
        try:
            from accelerate import Accelerator, DeepSpeedPlugin
        except ImportError:
            raise UsageError("this lab needs accelerate: pip install -c constraints.txt "
                             "-e '.[accelerate]'") from None
        super().build()  # the plain model and AdamW, as every lab
        plugin = None
        if self.zero_stage is not None:  # or from the launcher's config (ACCELERATE_USE_DEEPSPEED)
            plugin = DeepSpeedPlugin(zero_stage=self.zero_stage,
                                     gradient_accumulation_steps=self.accum)
        self.accelerator = Accelerator(gradient_accumulation_steps=self.accum,
                                       mixed_precision=self.mixed_precision,
                                       deepspeed_plugin=plugin,
                                       cpu=self.rt.device.type == "cpu" and plugin is None)
        state = self.accelerator.state
        if state.deepspeed_plugin is not None:
            # DeepSpeed needs the micro-batch; without a prepared DataLoader we say it.
            micro = self.settings.batch_size // (self.rt.world_size * self.accum)
            state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
            # accelerate fills an "auto" gradient_clipping with 1.0; the baseline clips nothing
            # (0 turns DeepSpeed's clipping off), so clipping would make the run differ
            state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = 0.0
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # What autocast really computes in: the dtype of a linear layer's output (accelerate
        # casts the model's outputs back to fp32, so the logits would not tell).
        first_linear = next(m for m in self.accelerator.unwrap_model(self.model).modules()
                            if isinstance(m, torch.nn.Linear))
        first_linear.register_forward_hook(lambda m, i, out: self.extra.__setitem__(
            "matmul_dtype", str(out.dtype).replace("torch.", "")))
        self.variant = str(state.distributed_type).split(".")[-1].lower() + \
            (f"-zero{state.deepspeed_plugin.zero_stage}" if state.deepspeed_plugin else "") + \
            (f"-accum{self.accum}" if self.accum > 1 else "") + \
            (f"-{self.mixed_precision}" if self.mixed_precision != "no" else "")
        self.extra.update(distributed_type=str(state.distributed_type),
                          num_processes=state.num_processes, accum=self.accum,
                          wrapped_as=type(self.model).__name__)
        if self.rt.world_size > 1 and state.num_processes != self.rt.world_size:
            raise UsageError(f"accelerate sees {state.num_processes} process(es) but "
                             f"{self.rt.world_size} were started; set ACCELERATE_USE_CPU=1 on "
                             "a machine without GPUs (see docs/launch.md)")

    def forward_backward(self, x, y):
        with library_collectives(self.comm):  # what DDP or DeepSpeed sends, counted
            return self._micro_batches(x, y)

    def _micro_batches(self, x, y):
        total = 0.0
        for xm, ym in zip(x.chunk(self.accum), y.chunk(self.accum)):
            with self.accelerator.accumulate(self.model):
                with self.meter.measure(self.model.parameters()):
                    loss = loss_fn(self.model(xm), ym)
                self.accelerator.backward(loss)  # divides by the accumulation steps itself
                total += loss.detach() / self.accum
                if not self.accelerator.sync_gradients:
                    # accelerate's own pattern steps every micro-batch (the optimizer skips
                    # until the sync); the shared loop steps once, after the last.
                    self.optimizer.step()
        return total

    def optimizer_step(self) -> None:
        with library_collectives(self.comm):
            self.optimizer.step()
            self.optimizer.zero_grad()

    def full_state(self):
        if self.accelerator.state.distributed_type.name in ("DEEPSPEED", "FSDP"):
            sd = self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 / FSDP shards
        else:
            sd = self.accelerator.unwrap_model(self.model).state_dict()
        return {k: v.detach().float().cpu() for k, v in sd.items()} if self.rt.is_main else None

    def memory(self) -> dict:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        return mem.snapshot(list(self.model.parameters()), opt, self.meter, self.rt.device)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.accelerate_lab", description=__doc__.splitlines()[0])
    p.add_argument("--accum", type=int, default=1,
                   help="gradient accumulation: micro-batches per optimizer step (default 1)")
    p.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="use accelerate's DeepSpeed plugin with this ZeRO stage (default: "
                        "whatever the accelerate config says, else no DeepSpeed)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                   help="accelerate's mixed_precision: autocast to bf16 or fp16, with its "
                        "gradient scaler for fp16 (default no)")
    return add_common_args(p)


GPU_ONLY = ("accelerate 1.15 runs its DeepSpeed and FSDP plugins only on accelerators: on a "
            "machine without CUDA it either stays single-process or, with ACCELERATE_USE_CPU=1, "
            "falls back to plain DDP (MULTI_CPU) and ignores the plugin. Here use "
            "`dtlab run deepspeed_zero` or `dtlab run zero --impl fsdp2`; on GPUs this works")


def check_args(args, settings, world: int) -> None:
    if not torch.cuda.is_available():
        plugin_env = [v for v in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")
                      if os.environ.get(v, "false").lower() == "true"]
        if args.zero_stage is not None or plugin_env:
            what = "--zero-stage" if args.zero_stage is not None else \
                f"{plugin_env[0]}=true (from the accelerate config)"
            raise UsageError(f"{what}: {GPU_ONLY}")
    if args.accum < 1:
        raise UsageError(f"--accum must be >= 1, got {args.accum}")
    check_divisible(settings.batch_size, world * args.accum,
                    what=f"world size x --accum ({world} x {args.accum})")


def make_strategy(rt, settings, args) -> Strategy:
    return AccelerateStrategy(rt, settings, args.accum, args.zero_stage, args.mixed_precision)


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        # Without it accelerate ignores the process group torchrun describes (DistributedType.NO).
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    return run_lab(registry.get("accelerate_lab"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
