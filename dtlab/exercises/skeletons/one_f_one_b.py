"""Exercise: the 1F1B pipeline schedule (docs/pipeline.md, labs/pipeline.py).

A pipeline of P stages trains M micro-batches per step. GPipe runs all M forwards, then all M
backwards, so every stage keeps M micro-batches of activations. 1F1B starts backwards as soon
as possible: a few forwards to fill the pipeline (warm-up), then alternately one forward and one
backward (steady state), then the remaining backwards (cool-down). Stage s keeps at most P - s
micro-batches alive instead of M.

Write ``one_f_one_b(stages, microbatches, stage)``: the list of actions of one stage in order,
("F", i) for the forward of micro-batch i and ("B", i) for its backward.

    dtlab check 1f1b --impl one_f_one_b.py

The checker compares your lists with the lab's for every P from 1 to 6, M from 1 to 8 and every
stage, and checks that each list runs every forward and backward exactly once, B(i) after F(i).

Hints
- The last stage (stage P-1) needs no warm-up: F0 B0 F1 B1 ...
- Stage s does P-1-s warm-up forwards, but never more than M.
- Backwards run in micro-batch order: 0, 1, 2, ...
"""


def one_f_one_b(stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    # TODO 1: warm-up forwards
    # TODO 2: steady state, one forward then one backward, until every forward has run
    # TODO 3: cool-down, the remaining backwards
    raise NotImplementedError("TODO: one_f_one_b (warm-up, steady 1F1B, cool-down)")
