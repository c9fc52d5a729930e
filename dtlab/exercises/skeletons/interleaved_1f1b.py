"""Exercise: the interleaved 1F1B schedule, Megatron's virtual pipeline stages (docs/pipeline.md,
labs/pipeline.py --schedule interleaved).

Plain 1F1B gives each of the P stages one contiguous block of layers. Interleaved 1F1B cuts the
model into P V chunks instead, and stage s holds V of them: chunk c of stage s is virtual stage
c P + s (with P=2, V=2: stage 0 holds virtual stages 0 and 2, stage 1 holds 1 and 3). A
micro-batch goes around the ring of stages V times. Each stage's forward is now 1/V of a stage's
work, so the warm-up and cool-down ramps (the bubble) are V times shorter, at the price of V
times more messages.

Micro-batches go through in groups of P. A stage's forwards, in order: micro-batches 0..P-1 on
chunk 0, the same P on chunk 1, ..., on chunk V-1; then micro-batches P..2P-1 from chunk 0
again, and so on. Numbering a stage's forwards k = 0, 1, ..., M V - 1, the k-th one is

    micro-batch (k // (P V)) P + k % P   on chunk (k // P) % V

The backwards run the same micro-batches in the same order but walk the chunks the other way
(the last chunk's gradient comes first): the k-th backward is the k-th forward's micro-batch on
chunk V - 1 - (k // P) % V. Stage s runs 2 (P - 1 - s) + (V - 1) P warm-up forwards (never more
than M V), then one forward one backward, then the remaining backwards.

Write ``interleaved_1f1b(stages, microbatches, stage, chunks)``: the list of actions of one
stage in order, ("F", i, c) for the forward of micro-batch i on chunk c and ("B", i, c) for its
backward; and ``bubble_fraction(stages, microbatches, chunks)``: the idle fraction of a stage's
time with equal chunks.

    dtlab check interleaved_1f1b --impl interleaved_1f1b.py

The checker compares your lists with the lab's for P from 2 to 4, V 2 and 3, M = P, 2P, 3P and
every stage, your bubble with the formula dtlab's cost model uses (dtlab/costmodel/shapes.py),
and checks that an M which is not a multiple of P is refused with a ValueError, as the lab
refuses it.

Hints
- Write the k-th forward as a small function first; the backwards reuse it with the chunk
  reversed.
- After P V forwards the chunk index wraps around to 0 (the modulo): the next group of P
  micro-batches starts again on the first chunk.
- The bubble: P - 1 idle slots as in 1F1B, but each slot is a chunk's work, 1/V of a stage's, so
  over the whole step it is (P-1)/V idle against M busy: divide by V before you add them up.
"""


def interleaved_1f1b(stages: int, microbatches: int, stage: int,
                     chunks: int) -> list[tuple[str, int, int]]:
    # TODO 0: refuse (ValueError) a number of micro-batches that is not a multiple of stages
    # TODO 1: the micro-batch and chunk of the stage's k-th forward (and k-th backward)
    # TODO 2: warm-up forwards, then one forward one backward, then the remaining backwards
    raise NotImplementedError("TODO: interleaved_1f1b (k-th forward: micro-batch and chunk; "
                              "warm-up, 1F1B, cool-down)")


def bubble_fraction(stages: int, microbatches: int, chunks: int) -> float:
    # TODO: idle over all of a stage's time, with chunks V times smaller than a stage
    raise NotImplementedError("TODO: bubble_fraction (P - 1 idle chunk-slots of V M + P - 1)")
