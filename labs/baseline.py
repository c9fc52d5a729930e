"""Baseline: the shared training loop on one process with the whole global batch.

Every other lab is compared with this run: same model, same initial weights, same data, same
optimizer. Whatever a strategy does (split the batch, shard the weights, cut the model into
stages), its losses and final parameters must match these within the lab's tolerance.

What one device does by default is exactly this loop (forward, loss, backward, optimizer step),
and the run record shows what that costs in memory by category and in time per step.
Explained in docs/baseline.md.

Run:
    python -m labs.baseline --steps 200
    dtlab run baseline --steps 200 --preset small
"""
from __future__ import annotations

import argparse
import sys

from dtlab import registry
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


def make_parser() -> argparse.ArgumentParser:
    return add_common_args(argparse.ArgumentParser(
        prog="labs.baseline", description="Single-process training, the reference run."))


def check_args(args, settings, world: int) -> None:
    if world != 1:
        raise UsageError(f"the baseline runs on one process, not {world}; use --nproc 1 "
                         "(or a data-parallel lab such as ddp)")


def make_strategy(rt, settings, args) -> Strategy:
    return Strategy(rt, settings)


def main(argv=None) -> int:
    # Comparing the baseline with itself would prove nothing; the record still carries the
    # losses, timing and memory that the other labs are compared against.
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_lab(registry.get("baseline"), make_parser(), make_strategy,
                   argv + ["--no-baseline"], check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
