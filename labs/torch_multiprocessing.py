"""torch.multiprocessing: workers started with mp.spawn, gradients averaged in shared memory.

No process group and no network: the parent puts tensors in shared memory (``share_memory_()``) and
hands them to W workers it starts with ``mp.spawn``. torch's pickler sends a shared tensor as a
handle to the same memory, not as a copy, so every worker reads and writes the very same bytes.

``--mode sync`` (equal to the baseline): a shared [W, P] gradient table. After backward, worker r
writes its flattened gradient into row r, all wait at a barrier, and every worker sums the rows
in the same order and divides by W, so all replicas take the identical step; a second barrier
keeps a fast worker from overwriting its row while a slow one still reads.

``--mode hogwild``: the model's parameters themselves live in shared memory and every worker
steps them whenever it likes, with no lock and no barrier (Recht et al., 2011). Updates race and
interleave differently every run, so it is *not* equivalent to the baseline; the lab reports
how far it drifted instead of pretending.

``--sharing-strategy file_descriptor|file_system`` picks how shared storage reaches the other
process; ``extra.sharing`` records what each leaves behind (open descriptors, /dev/shm files).

Explained in docs/multiprocessing.md.

Run:
    python -m labs.torch_multiprocessing --workers 2 --steps 20
    dtlab run torch_multiprocessing --workers 4 --mode hogwild
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.multiprocessing as mp

from dtlab import registry
from dtlab.measure.comm_counter import flatten, unflatten_into
from dtlab.train.model import ToyGPT
from dtlab.errors import fail
from dtlab.train.runtime import Runtime
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy
from dtlab.train.settings import settings_from_args


class Shared:
    """What the parent shares with every worker."""

    def __init__(self, ctx, workers: int, n_params: int, model: ToyGPT | None):
        self.grads = torch.zeros(workers, n_params).share_memory_()
        self.losses = torch.zeros(workers).share_memory_()
        self.barrier = ctx.Barrier(workers)
        self.results = ctx.Queue()       # gather_object: workers -> rank 0
        self.model = model               # hogwild: the one shared model


class SharedMemoryDP(Strategy):
    name = "torch_multiprocessing"

    def __init__(self, rt, settings, shared: Shared, mode: str):
        super().__init__(rt, settings)
        self.shared, self.mode = shared, mode
        self.variant = mode
        self.equivalent = mode == "sync"
        self.drift_reason = "Hogwild: unsynchronised updates" if mode == "hogwild" else ""

    def build(self) -> None:
        if self.mode == "hogwild":
            self.model = self.shared.model  # parameters in shared memory, stepped by all
            self.optimizer = self.make_optimizer(self.model.parameters())  # private moments
        else:
            super().build()
        self.extra["sharing"] = sharing_report()

    def after_backward(self) -> None:
        if self.mode == "hogwild":
            return  # no communication at all: the optimizer writes the shared weights directly
        grads = [p.grad for p in self.model.parameters()]
        table, r, w = self.shared.grads, self.rt.rank, self.rt.world_size
        table[r].copy_(flatten(grads))
        self.comm.record("shared_memory_write", table[r], sent_bytes=table[r].numel() * 4)
        self.barrier()                    # every row written
        mean = table.sum(0) / w           # same order everywhere: identical results
        self.barrier()                    # every row read; rows may be rewritten
        unflatten_into(mean, grads)

    def global_loss(self, local_loss: torch.Tensor) -> float:
        self.shared.losses[self.rt.rank] = local_loss.item()
        self.barrier()
        value = self.shared.losses.sum().item() / self.rt.world_size
        self.barrier()
        return value

    def gather_object(self, obj) -> list:
        self.shared.results.put((self.rt.rank, obj))
        got = {}
        if self.rt.rank == 0:
            got = dict(self.shared.results.get(timeout=self.rt.timeout_s)
                       for _ in range(self.rt.world_size))
        self.barrier()  # nobody queues the next round before rank 0 has read this one
        return [got[r] for r in range(self.rt.world_size)] if self.rt.rank == 0 else [obj]

    def barrier(self) -> None:
        self.shared.barrier.wait(self.rt.timeout_s)


def sharing_report() -> dict:
    """What this process holds for shared memory right now (torch names its /dev/shm files
    torch_<pid>_...: this worker's and the launching process's, not another job's)."""
    ours = (f"torch_{os.getpid()}_", f"torch_{os.getppid()}_")
    shm = [f for f in os.listdir("/dev/shm") if f.startswith(ours)] \
        if os.path.isdir("/dev/shm") else []
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    return {"strategy": mp.get_sharing_strategy(),
            "available": sorted(mp.get_all_sharing_strategies()),
            "torch_files_in_dev_shm": len(shm), "open_file_descriptors": fds}


def _worker(rank: int, argv: list[str], shared: Shared, workers: int, strategy: str, mode: str,
            codes) -> None:
    mp.set_sharing_strategy(strategy)
    torch.set_num_threads(1)  # W workers share the machine's cores
    rt = Runtime(rank=rank, world_size=workers, local_rank=rank, backend="shared-memory")
    parser = make_parser()
    codes[rank] = run_lab(registry.get("torch_multiprocessing"), parser,
                          lambda rt_, s, a: SharedMemoryDP(rt_, s, shared, mode), argv, rt=rt)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.torch_multiprocessing",
                                description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="processes mp.spawn starts (default 2)")
    p.add_argument("--mode", default="sync", choices=["sync", "hogwild"])
    p.add_argument("--sharing-strategy", default=mp.get_sharing_strategy(),
                   choices=sorted(mp.get_all_sharing_strategies()),
                   help=f"how shared storage is passed (default {mp.get_sharing_strategy()})")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    if world != 1:
        raise UsageError(f"this lab starts its own workers with mp.spawn; run it on 1 process "
                         f"(--nproc 1), not {world}, and set --workers")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if settings.batch_size % args.workers:
        raise UsageError(f"--batch-size {settings.batch_size} is not divisible by --workers "
                         f"{args.workers}; use a multiple of {args.workers}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        check_args(args, settings, int(os.environ.get("WORLD_SIZE", "1")))
    except (UsageError, ValueError) as e:
        fail(str(e))
    # Workers build their own model from the seed; hogwild needs one model in shared memory.
    mp.set_sharing_strategy(args.sharing_strategy)
    ctx = mp.get_context("spawn")
    model = ToyGPT(settings.model).share_memory() if args.mode == "hogwild" else None
    shared = Shared(ctx, args.workers, ToyGPT.count_params(settings.model), model)
    codes = torch.zeros(args.workers, dtype=torch.int32).share_memory_()
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(argv, shared, args.workers, args.sharing_strategy, args.mode, codes),
             nprocs=args.workers, join=True)
    print(f"{args.workers} workers finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return int(codes.max().item())


if __name__ == "__main__":
    sys.exit(main())
