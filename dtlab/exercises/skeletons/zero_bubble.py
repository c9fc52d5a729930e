"""Exercise: the zero-bubble schedule ZB-H1, with the backward split into B and W
(docs/pipeline.md, labs/pipeline.py --schedule zbh1; Qi et al. 2023, "Zero Bubble Pipeline
Parallelism").

A layer's backward computes two things: the gradient of its input, dL/dx = dL/dy W^T, which the
stage before waits for, and the gradient of its weights, dL/dW = x^T dL/dy, which nobody waits
for (the optimizer step, at the end). ZB-H1 runs them as two passes, B (input gradient) and W
(weight gradient). B goes where 1F1B's backward goes, so the gradients travel back as fast as
ever; the W's are put off and fill the cool-down, where 1F1B's stages sit idle.

Stage s of P, M micro-batches:
- F and B in 1F1B's order: P - 1 - s warm-up forwards (never more than M), then one forward one
  backward (B), then the remaining B's, all in micro-batch order;
- W running s micro-batches behind B: right after B of micro-batch i comes W of micro-batch
  i - s (when i >= s); the last s W's (micro-batches M - s .. M - 1) run at the very end.
So stage 0 does each W right after its B, and the last stage defers the most.

Write ``zbh1(stages, microbatches, stage)``: the list of actions of one stage in order, ("F", i),
("B", i) and ("W", i) for micro-batch i; and ``bubble_fraction(stages, microbatches)``: the idle
fraction of a stage's time when F, B and W take one slot each.

    dtlab check zero_bubble --impl zero_bubble.py

The checker compares your lists with the lab's ``zbh1_schedule`` for every P from 1 to 6, M from 1
to 8 and every stage, and your bubble with the formula of dtlab's cost model
(dtlab/costmodel/shapes.py) for M >= P, where the formula holds.

Hints
- Start from your 1F1B (the 1f1b exercise): the F's and B's are exactly its list.
- W of micro-batch i needs B of micro-batch i (its dL/dy); never the other way round.
- A W placed right after every B on every stage is correct arithmetic but stands on the critical
  path: the stage before is waiting for this stage's next B.
- The bubble: a step is 3M busy slots (F, B, W) and P - 1 idle ones.
"""


def zbh1(stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    # TODO 1: 1F1B's warm-up forwards, steady F/B pairs and cool-down B's
    # TODO 2: after B of micro-batch i, W of micro-batch i - stage (when there is one)
    # TODO 3: the last `stage` W's at the end
    raise NotImplementedError("TODO: zbh1 (1F1B's F and B, each W `stage` micro-batches "
                              "behind its B)")


def bubble_fraction(stages: int, microbatches: int) -> float:
    # TODO: idle slots over all slots of one stage, F, B and W one slot each
    raise NotImplementedError("TODO: bubble_fraction (P - 1 idle slots of 3M + P - 1)")
