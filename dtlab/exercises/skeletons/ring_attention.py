"""Exercise: the online-softmax merge of ring attention (docs/context-parallel.md,
labs/context_parallel.py).

Ring attention cuts a long sequence over W ranks. Each rank keeps its own queries and passes the
key/value blocks around the ring, so after W steps it has attended to every block, one block at a
time, without ever holding a whole row of scores. Flash attention does the same inside one GPU,
block by block through fast on-chip memory. Both rest on one fact: attention over the union of
two key blocks can be built from each block's own result, if each block brings one number per
query row besides its output.

For one query row, block A's scores s_j (already scaled by 1/sqrt(D), masked ones -inf) give

    lse_a = log sum_j exp(s_j)              the log of A's softmax denominator
    out_a = sum_j exp(s_j - lse_a) v_j      A's attention output (weights summing to 1)

and block B gives lse_b, out_b. Over A and B together the denominator is the sum of the two:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Folding the blocks in one at a time is the online softmax: keep a running maximum and a running
sum, and whenever a new block raises the maximum, rescale what you have so far (the running sum
and the running output) by exp(old max - new max). In this log-sum-exp form the rescaling is the
factor exp(lse_a - lse) in front of out_a: leave it out and out_a keeps weights that were
normalized for block A alone.

Write ``merge(out_a, lse_a, out_b, lse_b) -> (out, lse)``: out_* have shape [..., T, D], lse_*
[..., T]. A row that sees no key of a block (a causal mask) arrives with lse -inf and out 0.

    dtlab check ring_attention --impl ring_attention.py

The checker builds random q, k, v in float64, cuts the keys into 2 to 4 blocks, computes each
block's (out, lse), folds them with your merge in the order a rank of the ring receives them, and
compares with softmax attention over all keys at once (torch.softmax), within 1e-10. One case is
causal, so some rows of a block see no key at all.

Hints
- Never compute exp(lse): it overflows for large scores. Subtract the larger one first:
  m + log(exp(lse_a - m) + exp(lse_b - m)) with m = max(lse_a, lse_b) (or torch.logaddexp).
- A row with both lse -inf must come out as out 0, lse -inf. But -inf - (-inf) is NaN, so
  exp(lse_a - lse) is NaN there: guard it (torch.where).
- lse has one number per row, out has D: lse[..., None] to scale out.
"""
import torch


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # TODO 1: the merged log-sum-exp, without exp(lse) and without NaN where both are -inf
    # TODO 2: rescale out_a and out_b to it, and add them
    raise NotImplementedError("TODO: merge (the merged log-sum-exp, then rescale both outputs "
                              "to it)")
