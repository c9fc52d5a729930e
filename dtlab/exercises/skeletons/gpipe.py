"""Exercise: the GPipe pipeline schedule and its bubble (docs/pipeline.md, labs/pipeline.py).

A pipeline of P stages trains M micro-batches per step. GPipe, the simplest schedule, runs on
every stage all M forwards, then all M backwards, in micro-batch order:

    F0 F1 ... F(M-1) B0 B1 ... B(M-1)

Stage s cannot start F0 before the s stages in front of it have run theirs, and the backwards
ripple back the same way, so with equal stages a step takes M + P - 1 forward slots and M + P - 1
backward slots, of which each stage is idle for P - 1: the bubble, (P-1)/(M+P-1).

Write ``gpipe(stages, microbatches, stage)``: the list of actions of one stage in order,
("F", i) for the forward of micro-batch i and ("B", i) for its backward; and
``bubble_fraction(stages, microbatches)``: the idle fraction of a stage's time.

    dtlab check gpipe --impl gpipe.py

The checker compares your lists with the lab's for every P from 1 to 6, M from 1 to 8 and every
stage, and your bubble with the formula dtlab's cost model uses (dtlab/costmodel/shapes.py).

Hints
- Every stage runs the same list: the waiting is done by the messages, not by the schedule.
- The backwards go in the order the lab runs them, micro-batch 0 first (the GPipe paper draws
  them last-first; either works if every stage agrees, and the lab's run_schedule uses 0 first).
- Count the slots: M busy, P - 1 idle. The bubble divides the idle ones by all of them.
"""


def gpipe(stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    # TODO 1: every forward, in micro-batch order
    # TODO 2: then every backward, in micro-batch order
    raise NotImplementedError("TODO: gpipe (all forwards, then all backwards)")


def bubble_fraction(stages: int, microbatches: int) -> float:
    # TODO: idle slots over all slots of one stage
    raise NotImplementedError("TODO: bubble_fraction (P - 1 idle slots of M + P - 1)")
