"""ZeRO written out: optimizer state, gradients and parameters partitioned over data-parallel ranks.

Data parallelism keeps W full copies of everything; ZeRO keeps one copy spread over the W ranks and
moves pieces to where they are needed, step by step:

    stage 0  (plain data parallel)  params 4P   grads 4P    Adam state 8P     all-reduce
    stage 1  optimizer state split  params 4P   grads 4P    Adam state 8P/W   reduce-scatter +
    stage 2  + gradients split      params 4P   grads 4P/W  Adam state 8P/W   all-gather
    stage 3  + parameters split     params 4P/W grads 4P/W  Adam state 8P/W   all-gather x2 +
                                                                              reduce-scatter
(bytes per rank for P fp32 parameters and AdamW; docs/zero.md has the mixed-precision forms).

How it is cut here: every layer of the model (the embedding, each block, the head) is one *unit*.
A unit's parameters are laid end to end in one flat vector, padded to a multiple of W, and rank r
owns the r-th of W equal slices of it. AdamW steps only the owned slices, so its state is 1/W.
``--offload optimizer`` steps an fp32 copy of the owned slice on the CPU; ``--offload param``
(stage 3) keeps the slice there between uses. Memory is counted from the live tensors, beside
the formula (``extra.memory_vs_formula``). A checkpoint resumes at another world size or stage.

The same stages from the libraries: ``--impl fairscale-oss`` (1), ``fairscale-sdp`` (2),
``fsdp2`` (3), in labs/library/zero_libraries.py; DeepSpeed's in labs/deepspeed_zero.py.
Explained, step by step, in docs/zero.md.

Run:
    torchrun --nproc_per_node=2 -m labs.zero --stage 3 --steps 20
    dtlab run zero --nproc 4 --stage 2 --offload optimizer
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.costmodel.zero_memory import beside_formula, zero_state_bytes
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.measure import memory_meter as mem
from dtlab.measure.comm_counter import flatten, unflatten_into
from dtlab.reliability import checkpoint as ckpt
from dtlab.train.data import check_divisible
from dtlab.train.layout import ParamLayout
from dtlab.train.loop import Strategy

OFFLOAD_DEVICE = torch.device("cpu")


class Unit:
    """One layer of the model, its parameters viewed into one flat vector, sharded over W ranks."""

    def __init__(self, index: int, module: torch.nn.Module, names: dict, rank: int, world: int):
        self.index, self.module, self.key = index, module, f"unit{index}"
        self.params = list(module.parameters())
        self.names = [names[id(p)] for p in self.params]  # the baseline's names
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.shard_numel = math.ceil(self.numel / world)
        self.padded = self.shard_numel * world
        p0 = self.params[0]
        self.full = torch.zeros(self.padded, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            self.full[:self.numel].copy_(flatten([p.detach() for p in self.params]))
        for p, view in zip(self.params, self.full[:self.numel].split(self.sizes)):
            p.data = view.view_as(p)  # the module's parameters become views of the flat vector
        self.shard = self.full[rank * self.shard_numel:(rank + 1) * self.shard_numel]  # a view
        self.grads_ready = 0

    @property
    def nbytes(self) -> int:
        return self.padded * self.full.element_size()

    def is_gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def set_gathered(self, on: bool) -> None:
        """Give the flat vector its memory, or free it. The storage is resized in place, so the
        views of it that autograd saved for backward see the refilled memory when backward
        comes."""
        self.full.untyped_storage().resize_(self.nbytes if on else 0)


class ZeRO(Strategy):
    name = "zero"

    def __init__(self, rt, settings, stage: int = 2, offload: str = "none"):
        super().__init__(rt, settings)
        self.stage, self.offload = stage, offload
        self.variant = f"own-stage{stage}" + ("" if offload == "none" else f"-offload-{offload}")
        self.live_buffers = 0  # bytes of transient full-unit buffers alive now, and their peak
        self.extra["buffers_peak"] = 0

    # ---- set-up: units, owned slices, the optimizer over the slices
    def build(self) -> None:
        super().build()  # the model; its AdamW is replaced below
        rt, W = self.rt, self.rt.world_size
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.units = [Unit(i, layer, names, rt.rank, W)
                      for i, layer in enumerate(self.model.layers)]
        for u in self.units:
            if self.stage == 3:
                # Keep only the owned slice, as a tensor of its own (on the CPU with offload).
                where = OFFLOAD_DEVICE if self.offload == "param" else rt.device
                u.shard = u.shard.detach().to(where, copy=True)
                u.set_gathered(False)
                u.module.register_forward_pre_hook(lambda m, args, u=u: self._gather(u))
                u.module.register_forward_hook(
                    lambda m, args, out, u=u: self._after_forward(u, out))
            for p in u.params:
                p.register_post_accumulate_grad_hook(lambda p, u=u: self._grad_ready(u))
        if self.stage == 0:
            self.masters = [p for u in self.units for p in u.params]
        elif self.offload != "none" and not (self.stage == 3 and self.offload == "param"):
            # The optimizer works on an fp32 copy of the owned slice that lives on the CPU.
            self.masters = [u.shard.detach().to(OFFLOAD_DEVICE, copy=True) for u in self.units]
        else:
            self.masters = [u.shard for u in self.units]  # step the owned slice in place
        self.optimizer = self.make_optimizer(self.masters)
        pad = sum(u.padded for u in self.units)
        volume = 3 if self.stage == 3 else 2  # in units of (W-1)/W x 4 P
        self.extra.update(
            stage=self.stage, offload=self.offload, padded_params=pad,
            units=[{"numel": u.numel, "shard_numel": u.shard_numel} for u in self.units],
            memory_formula=zero_state_bytes(self.num_params(), W, self.stage, self.offload),
            comm_expected_bytes_per_step=volume * (W - 1) / W * 4 * pad)

    def _track(self, delta: int) -> None:
        self.live_buffers += delta
        self.extra["buffers_peak"] = max(self.extra["buffers_peak"], self.live_buffers)

    # ---- stage 3: gather a unit's weights just before use
    def _gather(self, u: Unit) -> None:
        if u.is_gathered():
            return
        u.set_gathered(True)
        self._track(u.nbytes)
        shard = u.shard.to(self.rt.device)  # from the CPU when parameters are offloaded
        self.comm.record("all_gather", u.full)
        dist.all_gather_into_tensor(u.full, shard)

    def _after_forward(self, u: Unit, out: torch.Tensor) -> None:
        if torch.is_grad_enabled() and out.requires_grad:
            # Fires when the gradient of the unit's output is ready: its backward comes next.
            out.register_hook(lambda grad, u=u: self._gather(u))
        self._free(u)

    def _free(self, u: Unit) -> None:
        if u.is_gathered():
            u.set_gathered(False)
            self._track(-u.nbytes)

    # ---- gradients: one unit at a time, as soon as backward has produced all of them
    def _grad_ready(self, u: Unit) -> None:
        u.grads_ready += 1
        if u.grads_ready < len(u.params):
            return
        flat = torch.zeros(u.padded, dtype=u.full.dtype, device=self.rt.device)
        flat[:u.numel] = flatten([p.grad for p in u.params])
        flat.div_(self.rt.world_size)  # average, not sum
        self._track(u.nbytes)
        if self.stage == 0:
            self.comm.record("all_reduce", flat)
            dist.all_reduce(flat)
            unflatten_into(flat[:u.numel], [p.grad for p in u.params])
        else:
            owned = torch.empty(u.shard_numel, dtype=flat.dtype, device=self.rt.device)
            self.comm.record("reduce_scatter", flat)
            dist.reduce_scatter_tensor(owned, flat)
            master = self.masters[u.index]
            in_place = master is u.shard and master.device == owned.device
            master.grad = owned if in_place else owned.to(master.device, copy=True)
            if self.stage >= 2:  # the full gradients are not needed any more
                for p in u.params:
                    p.grad = None
            if self.stage == 3:
                self._free(u)
        self._track(-u.nbytes)

    # ---- the step
    def forward_backward(self, x, y):
        self.model.zero_grad(set_to_none=True)
        for u in self.units:
            u.grads_ready = 0
        return super().forward_backward(x, y)  # zero_grad() of the slices' optimizer, then go

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self.stage == 0:
            return
        for u, master in zip(self.units, self.masters):
            if master is not u.shard:
                u.shard.copy_(master)  # back from the CPU copy (optimizer offload)
            if self.stage in (1, 2):
                # Everyone sends its updated slice, everyone receives the whole unit.
                self.comm.record("all_gather", u.full)
                dist.all_gather_into_tensor(u.full, u.shard.clone())

    # ---- where the owned slices sit: rank r holds piece r of each unit's flat vector (to
    # dtlab/train/layout.py, a tensor cut along its one dimension), and the generic code puts
    # the record's full parameters and the checkpoint's canonical state together from that
    def param_layout(self) -> ParamLayout:
        if self.stage == 0:  # every rank holds everything, as in DDP
            return super().param_layout()
        owned = {u.key: master for u, master in zip(self.units, self.masters)}
        return ParamLayout(owned, split=dict.fromkeys(owned, 0), tp=self.rt.world_size,
                           tp_rank=self.rt.rank)

    def full_state(self):
        full = super().full_state()  # a collective; whole unit vectors on rank 0
        return None if full is None else self._by_name(full)

    def canonical_state(self) -> dict:
        return self._by_name(ckpt.layout_canonical_state(self))

    @torch.no_grad()
    def load_canonical_state(self, full: dict) -> None:
        if self.stage == 0:
            return ckpt.layout_load_canonical_state(self, full)
        flat = self._by_unit(full)
        ckpt.layout_load_canonical_state(self, flat)  # the masters (owned slices), their moments
        for u, master in zip(self.units, self.masters):
            if self.stage < 3:
                u.full.copy_(flat[ckpt.param_key(u.key)])  # the model's views: the whole unit
            elif master is not u.shard:
                u.shard.copy_(master)

    def _by_name(self, flat: dict) -> dict:
        """Unit vectors ('unit3', 'model.unit3', 'adam.exp_avg.unit3') cut back into the
        baseline's tensors under their own names; other entries pass through."""
        units, out = {u.key: u for u in self.units}, {}
        for key, value in flat.items():
            u = units.get(ckpt.param_of(key) or key)
            if u is None:
                out[key] = value
                continue
            pieces = value[:u.numel].split(u.sizes)
            out.update({key[:-len(u.key)] + name: t.view(p.shape).clone()
                        for name, p, t in zip(u.names, u.params, pieces)})
        return out

    def _by_unit(self, full: dict) -> dict:
        """The inverse: each unit's tensors of one kind end to end, padded, under its key."""
        kinds = {k[:-len(n)] for k in full if (n := ckpt.param_of(k))}  # 'model.', 'adam...'
        out = {k: v for k, v in full.items() if ckpt.param_of(k) is None}
        for u in self.units:
            for kind in kinds:
                flat = out[kind + u.key] = torch.zeros(u.padded, dtype=u.full.dtype)
                flat[:u.numel] = torch.cat([full[kind + n].reshape(-1) for n in u.names])
        return out

    # ---- afterwards
    def memory(self) -> dict:
        params = [p for u in self.units for p in u.params]
        on_cpu = self.offload != "none"
        shards = [u.shard for u in self.units if self.stage == 3 and self.offload != "param"]
        grads = params + ([] if on_cpu else self.masters)
        out = {"params": mem.tensor_bytes(params + shards),
               "grads": mem.tensor_bytes(p.grad for p in grads),
               "optimizer": 0 if on_cpu else mem.optimizer_bytes(self.optimizer),
               "activations_peak": self.meter.peak, "peak": mem.process_peak_bytes(self.rt.device)}
        if on_cpu:
            out["offload"] = {"device": str(OFFLOAD_DEVICE),
                              "params": mem.tensor_bytes(self.masters),
                              "grads": mem.grad_bytes(self.masters),
                              "optimizer": mem.optimizer_bytes(self.optimizer)}
        # beside the formula, plus what it leaves out: AdamW's 4-byte step counter per tensor it
        # steps, and at stage 1 the averaged owned gradient slice beside the full gradients
        owned = 4 * self.num_params() / self.rt.world_size
        self.extra["memory_vs_formula"] = beside_formula(out, self.extra["memory_formula"], {
            ("cpu" if on_cpu else "device") + ".optimizer": 4 * len(self.masters),
            "device.grads": owned if self.stage == 1 and not on_cpu else 0})
        return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.zero", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", *dict(registry.get("zero").library)],
                   help="own: this file; fairscale-oss (stage 1), fairscale-sdp (2), fsdp2 (3)")
    p.add_argument("--stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="0: plain data parallel; 1: optimizer state; 2: + gradients; "
                        "3: + parameters partitioned (default 2)")
    p.add_argument("--offload", default="none", choices=["none", "optimizer", "param"],
                   help="keep the optimizer step (optimizer) and also the parameter slices "
                        "(param, stage 3) on the CPU")
    return add_common_args(p)


def own_stage(args) -> int:
    """--stage for --impl own: 2 unless given (a library's stage is fixed by --impl)."""
    return 2 if args.stage is None else args.stage


def check_args(args, settings, world: int) -> None:
    if world < 2:
        raise UsageError(f"ZeRO partitions state over data-parallel ranks; run it on 2 or more "
                         f"processes (--nproc 2), not {world}")
    if args.impl != "own":
        stage = registry.get("zero").library_strategy(args.impl).STAGES[args.impl]
        if args.stage not in (None, stage) or args.offload != "none":
            raise UsageError(f"--impl {args.impl} is ZeRO stage {stage} without "
                             "offload; drop --stage/--offload (they belong to --impl own)")
        if getattr(args, "ckpt_dir", None):
            raise UsageError(f"--ckpt-dir works with --impl own; the libraries' sharded "
                             f"optimizer states (--impl {args.impl}) are not checkpointed here")
    elif args.offload != "none" and own_stage(args) == 0:
        raise UsageError("--offload needs a ZeRO stage: use --stage 1, 2 or 3")
    elif args.offload == "param" and own_stage(args) != 3:
        raise UsageError("--offload param keeps parameter slices on the CPU, which only stage 3 "
                         "has; use --stage 3 (or --offload optimizer)")
    check_divisible(settings.batch_size, world)


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl != "own":
        return registry.get("zero").library_strategy(args.impl)(rt, settings, args.impl)
    return ZeRO(rt, settings, own_stage(args), args.offload)


def main(argv=None) -> int:
    return run_lab(registry.get("zero"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
