"""nn.DataParallel, and the same single-process data parallelism written out step by step.

One process drives R devices; every step:
  1. scatter:        cut the batch into R row slices, one per device;
  2. replicate:      copy the parameters from device 0 to every other device (every step, since
                     only device 0's parameters are updated);
  3. parallel_apply: run the R replicas' forward passes in R threads;
  4. gather:         concatenate the outputs on device 0 and compute the loss there;
  5. backward:       gradients flow back through the gather into each replica;
  6. reduce:         sum every replica's gradients onto device 0's parameters;
  7. update:         the optimizer steps device 0's parameters only (step 2 spreads them).
Device 0 does more than the others (the gathered outputs, the loss, the reduced gradients, the
optimizer state) and that imbalance is measured in ``extra.replica_bytes``.

``--impl own`` is the written-out version (on CPU the devices are virtual: R replicas on the CPU,
each counted apart). ``--impl torch`` is nn.DataParallel itself (labs/library/dataparallel_torch.py)
and needs CUDA devices; without them the lab says so and runs ``own``. nn.DataParallel does steps
2 and 6 inside autograd: its Broadcast function's backward is the reduce-add. Both runs also show
saving and loading with and without the ``module.`` prefix that the wrapper adds to every key
(``save_load_demo``, beside the variant).

Explained in docs/dataparallel.md.

Run:
    python -m labs.dataparallel --replicas 2 --steps 20
    dtlab run dataparallel --replicas 4 --impl torch      # on a machine with 4 GPUs
"""
from __future__ import annotations

import argparse
import copy
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from dtlab import registry
from dtlab.measure import memory_meter as mem
from dtlab.train.model import ToyGPT, loss_fn
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


class Gather(torch.autograd.Function):
    """Concatenate the replicas' outputs on device 0; backward hands each replica its rows."""

    @staticmethod
    def forward(ctx, target, *outputs):
        ctx.sizes = [o.shape[0] for o in outputs]
        ctx.devices = [o.device for o in outputs]
        return torch.cat([o.to(target) for o in outputs])

    @staticmethod
    def backward(ctx, grad):
        parts = grad.split(ctx.sizes)
        return (None, *(g.to(d) for g, d in zip(parts, ctx.devices)))


class OwnDataParallel(Strategy):
    name, variant = "dataparallel", "own"

    def __init__(self, rt, settings, replicas: int):
        super().__init__(rt, settings)
        self.n = replicas
        cuda_ok = torch.cuda.is_available() and torch.cuda.device_count() >= replicas
        self.devices = ([torch.device(f"cuda:{i}") for i in range(replicas)] if cuda_ok
                        else [torch.device("cpu")] * replicas)
        self.pool = ThreadPoolExecutor(max_workers=replicas)
        self.meters = [mem.ActivationMeter() for _ in range(replicas)]
        self.out_bytes = [0] * replicas

    def build(self) -> None:
        self.model = ToyGPT(self.settings.model).to(self.devices[0])  # replica 0 = the master
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.replicas = [self.model] + [copy.deepcopy(self.model).to(d) for d in self.devices[1:]]

    def replicate(self) -> None:
        with torch.no_grad():
            for r in self.replicas[1:]:
                for mine, master in zip(r.parameters(), self.model.parameters()):
                    mine.copy_(master)

    def _forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        with self.meters[i].measure(self.replicas[i].parameters()):
            out = self.replicas[i](x.to(self.devices[i]))
        self.out_bytes[i] = out.numel() * out.element_size()
        return out

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        for r in self.replicas[1:]:
            r.zero_grad(set_to_none=True)
        self.replicate()                                                   # 2
        xs = x.chunk(self.n)                                               # 1
        outs = list(self.pool.map(self._forward, range(self.n), xs))       # 3
        logits = Gather.apply(self.devices[0], *outs)                      # 4
        loss = loss_fn(logits, y.to(self.devices[0]))
        loss.backward()                                                    # 5
        with torch.no_grad():                                              # 6
            for r in self.replicas[1:]:
                for master, mine in zip(self.model.parameters(), r.parameters()):
                    master.grad.add_(mine.grad.to(master.device))
        self.gathered_bytes = logits.numel() * logits.element_size() * 2  # logits and their grad
        return loss.detach()                                               # 7: optimizer_step

    def memory(self) -> dict:
        """Device 0's states and the activations its replica saved: each replica's forward runs
        under its own meter (in its own thread), so the strategy's meter sees none of them."""
        snap = super().memory()
        snap["activations_peak"] = self.meters[0].peak
        return snap

    def close(self) -> None:
        per = []
        for i, r in enumerate(self.replicas or []):
            params = list(r.parameters())
            row = {"replica": i, "device": str(self.devices[i]),
                   "params": mem.param_bytes(params), "grads": mem.grad_bytes(params),
                   "activations": self.meters[i].peak, "outputs": self.out_bytes[i],
                   "optimizer": mem.optimizer_bytes(self.optimizer) if i == 0 else 0,
                   "gathered_outputs": self.gathered_bytes if i == 0 else 0}
            row["total"] = sum(v for k, v in row.items() if k not in ("replica", "device"))
            per.append(row)
        self.extra["replica_bytes"] = per
        if len(per) > 1:
            self.extra["replica0_over_others"] = per[0]["total"] / max(r["total"] for r in per[1:])
        # the wrapper's ``module.`` prefix, saved and loaded three ways (a check of the library)
        self.extra["save_load"] = registry.get("dataparallel").library_strategy(
            "torch").save_load_demo(self.model)
        self.checks_ok = all(v["ok"] for v in self.extra["save_load"].values())
        self.pool.shutdown()
        self.replicas = None
        super().close()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.dataparallel", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", "torch"],
                   help="own: written out (CPU or CUDA); torch: nn.DataParallel (CUDA only)")
    p.add_argument("--replicas", type=int, default=2, help="devices to spread the batch over")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    if world != 1:
        raise UsageError(f"data parallelism with DataParallel is one process driving several "
                         f"devices; run it on 1 process, not {world} (--nproc 1), and set "
                         "--replicas")
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if settings.batch_size < args.replicas:
        raise UsageError(f"--batch-size {settings.batch_size} is smaller than --replicas "
                         f"{args.replicas}; every replica needs at least one row")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl == "torch":
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpu >= args.replicas:
            return registry.get("dataparallel").library_strategy("torch")(rt, settings,
                                                                          args.replicas)
        rt.log(f"nn.DataParallel needs {args.replicas} CUDA devices and this machine has "
               f"{n_gpu}; running the written-out version (--impl own) instead")
    return OwnDataParallel(rt, settings, args.replicas)


def main(argv=None) -> int:
    return run_lab(registry.get("dataparallel"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
