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

- Gradients: when backward has produced every gradient of a unit (a hook per parameter counts
  them), the unit's gradients are flattened, divided by W and reduce-scattered: each rank receives
  the sum of its own slice. Stage 1 keeps the full gradients until the step; stage 2 frees them at
  once, so at most one unit's full gradients are alive.
- Parameters: stages 1 and 2 all-gather the updated slices after the step (reduce-scatter plus
  all-gather moves exactly what DDP's all-reduce moves). Stage 3 keeps only the slice: a forward
  pre-hook all-gathers the unit's weights just before its forward, a post-hook frees them, a hook
  on the unit's output gathers them again just before its backward, and they are freed once its
  gradients are reduced. Freeing resizes the flat buffer's storage to zero, so the views autograd
  saved for backward point at the same (refilled) memory when backward comes.
- Offload: ``--offload optimizer`` keeps an fp32 copy of the owned slice, its gradient and the Adam
  state on the CPU and runs the step there (the updated slice is copied back);
  ``--offload param`` (stage 3) also keeps the owned parameter slice on the CPU between uses. On a
  CPU-only machine source and destination are the same device, but the tensors are separate and
  counted separately (``memory.per_rank[r].offload``); on CUDA the placement is real.

``memory.per_rank`` is counted from the live tensors at the end of the run (after the last
step), by category, and ``extra.memory`` puts the formula beside it. ``extra.comm`` gives the
expected bytes per step from the volumes above.

The same stages from the libraries, on the same model and data: ``--impl fairscale-oss`` (1),
``fairscale-sdp`` (2), ``fsdp2`` (3); see labs/library/zero_libraries.py and labs/deepspeed_zero.py.

Explained in docs/zero.md (questions 51-54 of docs/questions.md).

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
from dtlab.reliability import checkpoint as ckpt
from dtlab.measure import memory_meter as mem
from dtlab.measure.comm_counter import flatten, unflatten_into
from dtlab.train.data import check_divisible
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy
from dtlab.costmodel.zero_memory import zero_state_bytes

OFFLOAD_DEVICE = torch.device("cpu")


class Unit:
    """One layer of the model, its parameters viewed into one flat vector, sharded over W ranks."""

    def __init__(self, index: int, module: torch.nn.Module, rank: int, world: int):
        self.index, self.module = index, module
        self.params = list(module.parameters())
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = math.ceil(self.numel / world)
        self.padded = self.shard_numel * world
        p0 = self.params[0]
        self.full = torch.zeros(self.padded, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            self.full[:self.numel].copy_(flatten([p.detach() for p in self.params]))
        offset = 0
        for p in self.params:  # the module's parameters become views of the flat vector
            p.data = self.full[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.lo = rank * self.shard_numel
        self.shard = self.full[self.lo:self.lo + self.shard_numel]  # stages 1-2: a view
        self.grads_ready = 0

    @property
    def nbytes(self) -> int:
        return self.padded * self.full.element_size()

    def is_gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def free_full(self) -> None:
        self.full.untyped_storage().resize_(0)

    def alloc_full(self) -> None:
        self.full.untyped_storage().resize_(self.nbytes)


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
        self.units = [Unit(i, layer, rt.rank, W) for i, layer in enumerate(self.model.layers)]
        for u in self.units:
            if self.stage == 3:
                # Keep only the owned slice, as a tensor of its own (on the CPU with offload).
                where = OFFLOAD_DEVICE if self.offload == "param" else rt.device
                u.shard = u.shard.detach().to(where, copy=True)
                u.free_full()
                u.module.register_forward_pre_hook(lambda m, args, u=u: self._gather(u))
                u.module.register_forward_hook(lambda m, args, out, u=u: self._after_forward(u, out))
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
        P = self.num_params()
        self.extra.update(stage=self.stage, offload=self.offload,
                          units=[{"numel": u.numel, "shard_numel": u.shard_numel}
                                 for u in self.units],
                          padded_params=sum(u.padded for u in self.units))
        self.extra["memory_formula"] = zero_state_bytes(P, W, self.stage, self.offload)
        pad = sum(u.padded for u in self.units)
        volumes = {0: 2, 1: 2, 2: 2, 3: 3}  # in units of (W-1)/W x 4 P
        self.extra["comm_expected_bytes_per_step"] = volumes[self.stage] * (W - 1) / W * 4 * pad

    def _track(self, delta: int) -> None:
        self.live_buffers += delta
        self.extra["buffers_peak"] = max(self.extra["buffers_peak"], self.live_buffers)

    # ---- stage 3: gather a unit's weights just before use
    def _gather(self, u: Unit, count: bool = True) -> None:
        if u.is_gathered():
            return
        u.alloc_full()
        self._track(u.nbytes)
        shard = u.shard.to(self.rt.device)  # from the CPU when parameters are offloaded
        if count:
            self.comm.record("all_gather", u.full)
        dist.all_gather_into_tensor(u.full, shard)

    def _after_forward(self, u: Unit, out: torch.Tensor) -> None:
        if torch.is_grad_enabled() and out.requires_grad:
            # Fires when the gradient of the unit's output is ready: its backward comes next.
            out.register_hook(lambda grad, u=u: self._gather(u))
        self._free(u)

    def _free(self, u: Unit) -> None:
        if u.is_gathered():
            u.free_full()
            self._track(-u.nbytes)

    # ---- gradients: one unit at a time, as soon as backward has produced all of them
    def _grad_ready(self, u: Unit) -> None:
        u.grads_ready += 1
        if u.grads_ready < len(u.params):
            return
        W = self.rt.world_size
        flat = torch.zeros(u.padded, dtype=u.full.dtype, device=self.rt.device)
        flat[:u.numel] = flatten([p.grad for p in u.params])
        flat.div_(W)  # average, not sum
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

    # ---- checkpoints: the canonical state (dtlab/reliability/checkpoint.py) from the owned slices, so
    # a checkpoint written at one world size or stage resumes at another
    def _whole(self, u: Unit, shard: torch.Tensor) -> torch.Tensor:
        """The unit-sized vector put together from every rank's slice of it (a collective)."""
        out = torch.empty(u.padded, dtype=shard.dtype, device=self.rt.device)
        dist.all_gather_into_tensor(out, shard.detach().to(self.rt.device).contiguous())
        return out[:u.numel].cpu()

    def canonical_state(self) -> dict:
        if self.stage == 0:  # every rank holds everything, as in DDP
            return ckpt.layout_canonical_state(self)
        names = {id(p): n for n, p in self.model.named_parameters()}
        out, step = {}, 0.0
        for u, master in zip(self.units, self.masters):
            state = self.optimizer.state.get(master, {})
            flats = {ckpt.param_key: self._whole(u, u.shard)}
            for m in ckpt.MOMENTS:
                if m in state:
                    flats[lambda n, m=m: ckpt.moment_key(m, n)] = self._whole(u, state[m])
            step = max(step, float(state.get("step", 0.0)))
            offset = 0
            for p in u.params:
                for key, flat in flats.items():
                    out[key(names[id(p)])] = flat[offset:offset + p.numel()].view(p.shape).clone()
                offset += p.numel()
        out[ckpt.STEP_KEY] = torch.tensor(step)
        return out

    @torch.no_grad()
    def load_canonical_state(self, full: dict) -> None:
        if self.stage == 0:
            return ckpt.layout_load_canonical_state(self, full)
        names = {id(p): n for n, p in self.model.named_parameters()}
        states = []
        for u, master in zip(self.units, self.masters):
            def unit_vector(key):  # the unit's flat, padded vector of one canonical quantity
                flat = torch.zeros(u.padded, dtype=u.full.dtype)
                flat[:u.numel] = torch.cat([full[key(names[id(p)])].reshape(-1)
                                            for p in u.params])
                return flat
            params = unit_vector(ckpt.param_key)
            if self.stage < 3:
                u.full.copy_(params)  # the owned slice is a view of it
            else:
                u.shard.copy_(params[u.lo:u.lo + u.shard_numel])
            if master is not u.shard:
                master.copy_(params[u.lo:u.lo + u.shard_numel])
            if ckpt.moment_key("exp_avg", names[id(u.params[0])]) in full:
                states.append((master, *(unit_vector(lambda n, m=m: ckpt.moment_key(m, n))[
                    u.lo:u.lo + u.shard_numel] for m in ckpt.MOMENTS)))
        if states:
            ckpt.set_adam_state(self.optimizer, states, full[ckpt.STEP_KEY].item())

    # ---- afterwards
    def full_state(self):
        if self.stage == 3:  # a collective: every rank gathers, rank 0 keeps a copy
            state = {}
            names = {id(p): n for n, p in self.model.named_parameters()}
            for u in self.units:
                self._gather(u, count=False)
                state.update({names[id(p)]: p.detach().cpu().clone() for p in u.params})
                self._free(u)
            return state if self.rt.is_main else None
        return super().full_state()

    def memory(self) -> dict:
        params = [p for u in self.units for p in u.params]
        dev_params = params + ([u.shard for u in self.units]
                               if self.stage == 3 and self.offload != "param" else [])
        on_cpu = self.offload != "none"
        masters = self.masters if on_cpu else []
        dev_grads = params + ([] if on_cpu else self.masters)
        out = {
            "params": mem.tensor_bytes(dev_params),
            "grads": mem.tensor_bytes(p.grad for p in dev_grads),
            "optimizer": 0 if on_cpu else mem.optimizer_bytes(self.optimizer),
            "activations_peak": self.meter.peak,
            "peak": mem.process_peak_bytes(self.rt.device),
        }
        if on_cpu:
            out["offload"] = {"device": str(OFFLOAD_DEVICE),
                              "params": mem.tensor_bytes(masters),
                              "grads": mem.grad_bytes(masters),
                              "optimizer": mem.optimizer_bytes(self.optimizer)}
        self.extra["memory_vs_formula"] = self._compare(out)
        return out

    def _compare(self, measured: dict) -> dict:
        """Measured bytes by category beside the formula plus the buffers it leaves out."""
        f = self.extra["memory_formula"]
        P, W = self.num_params(), self.rt.world_size
        # AdamW keeps a 4-byte step counter per tensor it steps; stage 1 holds the averaged
        # owned gradient slice (the reduce-scatter output) beside the full gradients.
        steps = 4 * len(self.masters)
        owned_grad = 4 * P / W if self.stage == 1 and self.offload == "none" else 0
        side = "cpu" if self.offload != "none" else "device"
        rows = {}
        for where, got in (("device", measured), ("cpu", measured.get("offload", {}))):
            for cat in ("params", "grads", "optimizer"):
                buffers = (steps if cat == "optimizer" and where == side else 0) + \
                    (owned_grad if cat == "grads" and where == "device" else 0)
                expect = f[where][cat] + buffers
                rows[f"{where}.{cat}"] = {
                    "measured": got.get(cat, 0), "formula": f[where][cat], "buffers": buffers,
                    "ratio": got.get(cat, 0) / expect if expect else None}
        return rows


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.zero", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own",
                   choices=["own", "fairscale-oss", "fairscale-sdp", "fsdp2"],
                   help="own: this file; fairscale-oss (stage 1), fairscale-sdp (stage 2), "
                        "fsdp2 (stage 3): the libraries' versions (labs/library/zero_libraries.py)")
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
    if args.impl != "own" and getattr(args, "ckpt_dir", None):
        raise UsageError(f"--ckpt-dir works with --impl own; the libraries' sharded optimizer "
                         f"states (--impl {args.impl}) are not checkpointed here")
    stage = own_stage(args)
    if args.offload != "none" and stage == 0:
        raise UsageError("--offload needs a ZeRO stage: use --stage 1, 2 or 3")
    if args.offload == "param" and stage != 3:
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
