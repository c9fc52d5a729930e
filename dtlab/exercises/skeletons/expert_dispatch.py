"""Exercise: the token dispatch of expert parallelism (docs/expert-parallel.md,
labs/expert_parallel.py).

In a mixture-of-experts layer every rank holds some of the experts, and a router sends each
token to the rank that holds its expert. How many tokens go where is decided by the router at run
time, so the exchange is uneven: an all-to-all whose split sizes differ per pair of ranks (one
rank may send another nothing, or have no tokens at all). After the experts ran, their outputs
travel back the same way, reversed, and must land in the order the tokens had.

Write ``dispatch(x, dest) -> (received, plan)``: row i of x (shape [n, ...], n may be 0) goes to
rank dest[i] (int64, shape [n]). ``received`` holds the rows that arrived on this rank, grouped by
source rank (rank 0's first) and, within a source, in the order they had there. ``plan`` is
whatever ``combine`` will need. Write ``combine(y, plan)``: y has one row per row of received (the
experts' outputs, in received's order); send every row back to where it came from and return them
in the original order of x, so that row i of the result is the output for row i of x.

    dtlab check expert_dispatch --impl expert_dispatch.py

The checker runs your functions on 2 and 3 processes (gloo) with uneven assignments, including
a rank with no rows at all, and compares what arrived and what came back with the exact rows.

Hints
- dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes): output first,
  and its splits are what this rank RECEIVES from each rank; the input's, what it sends.
- First exchange the counts (an all_to_all_single of one number per rank) so each rank knows
  how many rows it will receive, and allocate the output from them.
- Sort the rows by destination with a stable sort (torch.argsort(dest, stable=True)) and keep
  the permutation: the way back undoes it (out[order] = what came back).
- A rank with no rows has no x[0]: take the row shape from x.shape[1:].
"""
import torch
import torch.distributed as dist


def dispatch(x: torch.Tensor, dest: torch.Tensor):
    world = dist.get_world_size()
    # TODO 1: order the rows by destination (stable), count the rows for each rank
    # TODO 2: exchange the counts, so this rank knows how many rows each rank sends it
    # TODO 3: all_to_all_single the rows with uneven splits; return (received, plan)
    raise NotImplementedError("TODO: dispatch (sort by destination, exchange the counts, then "
                              "the rows)")


def combine(y: torch.Tensor, plan):
    # TODO: the reverse all-to-all (the splits the other way round), then undo the sort
    raise NotImplementedError("TODO: combine (the all-to-all back, then the original order)")
