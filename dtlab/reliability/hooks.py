"""What reliability adds to the training loop, as its step hooks (``dtlab.train.loop.StepHook``):
checkpoints (resume before the first step, save when due), injected faults (before a step), and
the flight recorder with its watchdog (what a hang dumps). The harness hands them to the loop."""
from __future__ import annotations

import contextlib

from dtlab.reliability import checkpoint as ckpt
from dtlab.reliability import flight
from dtlab.train.loop import StepHook


class CheckpointHook(StepHook):
    def begin(self, strategy) -> int:
        losses, steps = strategy.trajectory
        return ckpt.resume(strategy, losses, steps)

    def after_step(self, strategy, step: int, row: dict) -> None:
        if strategy.ckpt_plan.due(step + 1, strategy.settings.steps):
            losses, steps = strategy.trajectory
            row["ckpt_s"] = ckpt.save(strategy, step + 1, losses, steps)


class FaultHook(StepHook):
    def before_step(self, strategy, step: int) -> None:
        strategy.fault_plan.before_step(strategy.rt, step)


class FlightHook(StepHook):
    """Records every collective of this rank; the watchdog dumps the record when the run hangs."""

    def begin(self, strategy) -> int:
        self._stack = contextlib.ExitStack()
        rt = strategy.rt
        strategy.flight = self._stack.enter_context(
            flight.FlightRecorder(rt.rank, rt.world_size, strategy.settings.out))
        self._stack.enter_context(flight.Watchdog(strategy.flight, strategy.settings.out))
        return 0

    def before_step(self, strategy, step: int) -> None:
        strategy.flight.set_step(step)

    def end(self, strategy) -> None:
        self._stack.close()


def reliability_hooks(strategy) -> list[StepHook]:
    """The hooks a run gets, in order: checkpoints (the resume runs before the recorder starts;
    a save is recorded), the flight recorder where there is a process group, injected faults."""
    return [CheckpointHook()] + ([FlightHook()] if strategy.rt.distributed else []) + [FaultHook()]
