"""DDP: data parallelism with one process per device, gradients averaged by all-reduce.

Answers QUESTIONS.md 3, 9 and 35-38 (first part). Every rank holds a full replica, starts from
the same weights (DDP broadcasts rank 0's state when it wraps the model), takes its rows of the
global batch, and runs forward and backward on them. During backward, DDP packs gradients into
buckets (by default 25 MiB, filled in reverse parameter order, the order backward produces them)
and all-reduces each bucket as soon as it is full, so communication overlaps the rest of backward.
After the average every replica holds the same gradient, so the same optimizer step keeps them
equal: the run equals one process training on the whole global batch.

Here the all-reduce goes through a communication hook that does what DDP's default does (divide by
the world size, all-reduce) and counts every bucket, so the record's ``comm`` shows the bytes.
Per step and rank, with G gradient bytes and W ranks, a ring all-reduce sends 2(W-1)/W * G.

Run:
    torchrun --nproc_per_node=2 -m labs.ddp --steps 20
    dtlab run ddp --nproc 4 --steps 20 --bucket-mb 0.01
"""
from __future__ import annotations

import argparse
import sys

from torch.nn.parallel import DistributedDataParallel as DDP

from labs.core.comm import counting_allreduce_hook
from labs.core.train import Strategy, add_common_args, run_lab


class TorchDDP(Strategy):
    name, variant = "ddp", "torch"

    def __init__(self, rt, settings, bucket_mb: float = 25.0):
        super().__init__(rt, settings)
        self.bucket_mb = bucket_mb

    def build(self) -> None:
        super().build()  # the plain model and its optimizer (DDP shares the parameters)
        if self.rt.distributed:
            device_ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=device_ids, bucket_cap_mb=self.bucket_mb)
            self.model.register_comm_hook(None, counting_allreduce_hook(self.comm))
        self.extra["bucket_mb"] = self.bucket_mb


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.ddp", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="torch", choices=["torch"],
                   help="torch: torch.nn.parallel.DistributedDataParallel")
    p.add_argument("--bucket-mb", type=float, default=25.0,
                   help="DDP bucket size in MiB (default 25, as DDP's)")
    return add_common_args(p)


def make_strategy(rt, settings, args) -> Strategy:
    if args.bucket_mb <= 0:
        from labs.core.train import UsageError
        raise UsageError(f"--bucket-mb must be > 0, got {args.bucket_mb}")
    return TorchDDP(rt, settings, args.bucket_mb)


def main(argv=None) -> int:
    return run_lab("ddp", make_parser(), make_strategy, argv)


if __name__ == "__main__":
    sys.exit(main())
