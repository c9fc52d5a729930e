"""DDP: data parallelism with one process per device, gradients averaged by all-reduce.

Every rank holds a full replica, starts from the same weights, takes its rows of the global batch
and runs forward and backward on them. During backward, gradients are packed into buckets (25 MiB
by default, filled in reverse parameter order, the order backward produces them) and each bucket is
all-reduced as soon as it is full, so communication overlaps the rest of backward. After the
average every replica holds the same gradient, the same optimizer step keeps them equal, and the
run equals one process training on the whole global batch.

Two implementations:
- ``--impl torch``: torch.nn.parallel.DistributedDataParallel, its all-reduce routed through a
  communication hook that does what DDP's default does and counts every bucket
  (labs/library/ddp_torch.py).
- ``--impl own``: the same machinery written out below: broadcast of rank 0's initial state,
  per-parameter hooks that fill buckets, an asynchronous all-reduce per full bucket (our ring
  from ring_allreduce.py on a communication thread, or the library's with ``--allreduce
  library``), a wait before the optimizer step, the average. ``--allreduce shm`` (ranks on one
  host) makes the gradients views of shared-memory buckets, as DDP's gradient_as_bucket_view
  does, and averages them in place where the other ranks read them; ``--allreduce hier`` does
  that inside each node and runs rings between the nodes (dtlab/collectives/hier.py).
  ``--accum K`` splits each rank's rows into K micro-batches and communicates only after the
  last one (what DDP's ``no_sync`` is for). ``--no-overlap`` waits for backward to finish
  before sending anything, to measure what the overlap saves.

Per step and rank, with G gradient bytes and W ranks, a ring all-reduce sends 2(W-1)/W * G.

Explained in docs/ddp.md.

Run:
    torchrun --nproc_per_node=2 -m labs.ddp --steps 20
    dtlab run ddp --nproc 4 --impl own --allreduce ring --accum 2 --bucket-mb 0.02
    dtlab run ddp --nproc 2 --impl own --allreduce shm
    dtlab run ddp --nnodes 2 --nproc 2 --impl own --allreduce hier     # namespace cluster
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.measure.comm_counter import unflatten_into
from dtlab.train.data import check_divisible
from dtlab.train.model import loss_fn
from dtlab.train.settings import finite
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy
from dtlab.collectives.hier import hier_all_reduce, hier_tensor
from dtlab.collectives.ring import ring_all_reduce
from dtlab.collectives.shm import shm_all_reduce, shm_tensor


class Bucket:
    """Consecutive parameters whose gradients travel in one all-reduce."""

    def __init__(self, index: int, params: list[torch.nn.Parameter]):
        self.index, self.params = index, params
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                device=params[0].device)
        self.ready = 0
        self.pending = None  # a Work (library) or a Future (our ring on the comm thread)


class OwnDDP(Strategy):
    name = "ddp"

    def __init__(self, rt, settings, bucket_mb=25.0, allreduce="ring", accum=1, overlap=True):
        super().__init__(rt, settings)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.allreduce, self.accum, self.overlap = allreduce, accum, overlap
        self.variant = f"own-{allreduce}" + (f"-accum{accum}" if accum > 1 else "") + \
            ("" if overlap else "-nooverlap")
        self.timings = {"backward_s": [], "wait_s": []}

    def build(self) -> None:
        super().build()
        params = list(self.model.parameters())
        if self.rt.distributed:
            # 1. Same start on every rank: rank 0's parameters win. (The model is already equal
            #    by seed; the broadcast is what makes DDP safe when user code is not.)
            for p in params:
                dist.broadcast(p.data, src=0)
            self.extra["initial_broadcast_bytes"] = sum(p.numel() * p.element_size()
                                                        for p in params)
        # 2. Buckets in reverse order of registration: the last layers' gradients are ready
        #    first in backward, so the first bucket fills (and leaves) early.
        self.buckets, current, size = [], [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= self.bucket_bytes:
                self.buckets.append(Bucket(len(self.buckets), current))
                current, size = [], 0
        if current:
            self.buckets.append(Bucket(len(self.buckets), current))
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        # 3. A hook per parameter, fired once its gradient has been accumulated into .grad.
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        # Our ring is blocking point-to-point code; a single communication thread runs the
        # buckets one after another, in launch order, while backward goes on in this thread.
        self.comm_thread = ThreadPoolExecutor(max_workers=1) \
            if self.allreduce in ("ring", "hier") else None
        if self.allreduce == "shm" and self.rt.distributed:
            hosts = [None] * self.rt.world_size
            dist.all_gather_object(hosts, socket.gethostname())
            if len(set(hosts)) > 1:
                self.rt.log(f"--allreduce shm needs every rank on one host, these are on "
                            f"{len(set(hosts))}: using the library's all-reduce instead")
                self.allreduce = "library"
        self.views = self.allreduce in ("shm", "hier") and self.rt.distributed
        if self.views:
            # 4. Gradients as views of the buckets (DDP's gradient_as_bucket_view), the buckets
            #    this rank's shared buffers (of its node, for hier): backward writes the
            #    gradients where the other ranks read them, and the reduction is in place, with
            #    no copy in or out.
            shared = shm_tensor if self.allreduce == "shm" else hier_tensor
            for b in self.buckets:
                b.flat = shared(b.flat.numel(), b.flat.dtype, name=f"ddp-bucket{b.index}")
                b.flat.zero_()
                offset = 0
                for p in b.params:
                    p.grad = b.flat[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
        self.extra.update(bucket_mb=self.bucket_bytes / 2**20, accum=self.accum,
                          allreduce=self.allreduce, overlap=self.overlap,
                          buckets=[sum(p.numel() for p in b.params) for b in self.buckets])

    # ---- hooks: fill buckets, launch them in order
    def _grad_ready(self, p: torch.nn.Parameter) -> None:
        if not (self.sync_now and self.overlap and self.rt.distributed):
            return
        b = self.bucket_of[p]
        b.ready += 1
        # Launch strictly in bucket order, so every rank issues the same sequence of
        # collectives even if gradients became ready in a different order.
        while self.next_bucket < len(self.buckets) and \
                self.buckets[self.next_bucket].ready == len(self.buckets[self.next_bucket].params):
            self._launch(self.buckets[self.next_bucket])
            self.next_bucket += 1

    def _launch(self, b: Bucket) -> None:
        if self.allreduce == "shm":  # the gradients are the bucket: average it where it is
            shm_all_reduce(b.flat.div_(self.rt.world_size), self.comm)
            return
        if self.allreduce == "hier":  # the same, with the rings across nodes on the comm thread
            b.pending = self.comm_thread.submit(hier_all_reduce, b.flat.div_(self.rt.world_size),
                                                self.comm)
            return
        torch.cat([p.grad.reshape(-1) if p.grad is not None else
                   torch.zeros(p.numel(), device=p.device) for p in b.params], out=b.flat)
        b.flat.div_(self.rt.world_size)
        if self.allreduce == "library":
            self.comm.record("all_reduce", b.flat)
            b.pending = dist.all_reduce(b.flat, async_op=True)
        else:
            b.pending = self.comm_thread.submit(ring_all_reduce, b.flat, self.comm)

    # ---- the step
    def forward_backward(self, x, y):
        # with bucket views the gradients are zeroed in place: they must stay the views
        self.optimizer.zero_grad(set_to_none=not self.views)
        for b in self.buckets:
            b.ready, b.pending = 0, None
        self.next_bucket = 0
        total = 0.0
        t_bwd = 0.0
        micro = zip(x.chunk(self.accum), y.chunk(self.accum))
        for k, (xm, ym) in enumerate(micro):
            # Communicate only after the last micro-batch; before it, gradients accumulate
            # locally in .grad (DDP's no_sync).
            self.sync_now = k == self.accum - 1
            with self.meter.measure(self.model.parameters()):
                loss = loss_fn(self.model(xm), ym) / self.accum
            t0 = time.perf_counter()
            loss.backward()
            t_bwd += time.perf_counter() - t0
            total += loss.detach()
        self.timings["backward_s"].append(t_bwd)
        return total

    def after_backward(self) -> None:
        if not self.rt.distributed:
            return
        t0 = time.perf_counter()
        while self.next_bucket < len(self.buckets):  # --no-overlap, or unused parameters
            self._launch(self.buckets[self.next_bucket])
            self.next_bucket += 1
        for b in self.buckets:
            if self.allreduce == "shm":
                continue  # reduced in place, in the gradients themselves
            b.pending.wait() if self.allreduce == "library" else b.pending.result()
            if not self.views:
                unflatten_into(b.flat, [p.grad for p in b.params])
        self.timings["wait_s"].append(time.perf_counter() - t0)

    def close(self) -> None:
        if self.comm_thread is not None:
            self.comm_thread.shutdown()
        t = self.timings
        if t["backward_s"]:
            self.extra["overlap_timing"] = {
                "backward_s_median": statistics.median(t["backward_s"]),
                "wait_after_backward_s_median": statistics.median(t["wait_s"] or [0.0]),
                "note": "with overlap, communication runs during backward and only the rest is "
                        "waited for; compare a --no-overlap run of the same settings"}
        super().close()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.ddp", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="torch", choices=["torch", "own"],
                   help="torch: DistributedDataParallel; own: the same machinery written out")
    p.add_argument("--bucket-mb", type=finite, default=25.0,
                   help="bucket size in MiB (default 25, as DDP's)")
    p.add_argument("--allreduce", default="ring", choices=["ring", "library", "shm", "hier"],
                   help="--impl own: our ring (ring_allreduce.py), the library's all_reduce, "
                        "the shared-memory one in place in the gradients (one host), or hier: "
                        "shared memory in each node and a ring between nodes")
    p.add_argument("--accum", type=int, default=1,
                   help="--impl own: micro-batches per step, one all-reduce per step")
    p.add_argument("--no-overlap", action="store_true",
                   help="--impl own: start communication only after backward has finished")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    if args.bucket_mb <= 0:
        raise UsageError(f"--bucket-mb must be > 0, got {args.bucket_mb}")
    if args.accum < 1:
        raise UsageError(f"--accum must be >= 1, got {args.accum}")
    if args.impl == "torch" and (args.accum != 1 or args.no_overlap or args.allreduce != "ring"):
        raise UsageError("--accum, --no-overlap and --allreduce belong to --impl own; add "
                         "--impl own")
    check_divisible(settings.batch_size, world * args.accum,
                    what=f"world size x --accum ({world} x {args.accum})")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl == "torch":
        return registry.get("ddp").library_strategy("torch")(rt, settings, args.bucket_mb)
    return OwnDDP(rt, settings, args.bucket_mb, args.allreduce, args.accum, not args.no_overlap)


def main(argv=None) -> int:
    return run_lab(registry.get("ddp"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
