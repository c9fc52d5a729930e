"""Exercise: the two communication functions of Megatron sequence parallelism
(docs/sequence-parallel.md, labs/tensor_parallel.py --sp).

Tensor parallelism leaves the LayerNorms, dropout and the residual stream replicated: every TP
rank holds all T tokens there. Sequence parallelism cuts that region along the sequence: rank r
holds tokens [r T/W, (r+1) T/W) of a [batch, seq, hidden] activation. Two functions move between
the regions, each the other's conjugate (one's backward is the other's forward):

- ``GatherFromSP``, before a column-parallel layer (which needs every token): forward, an
  all-gather along the sequence, [b, T/W, h] on every rank -> [b, T, h], rank r's tokens at
  [r T/W, (r+1) T/W); backward, a reduce-scatter along the sequence: every rank's next layer used
  all T tokens, so the gradient of rank r's tokens is the SUM over the ranks of their gradients,
  and rank r keeps only its own tokens' part, [b, T, h] -> [b, T/W, h].
- ``ReduceScatterToSP``, after a row-parallel layer (whose output is a partial sum on every
  rank): forward, a reduce-scatter along the sequence, [b, T, h] -> [b, T/W, h] of the sum;
  backward, an all-gather along the sequence, [b, T/W, h] -> [b, T, h].

Together they move the same bytes as tensor parallelism's all-reduce (an all-reduce is a
reduce-scatter then an all-gather), with the sequence-parallel work in between.

Write both as torch.autograd.Function subclasses, called ``GatherFromSP.apply(x)`` and
``ReduceScatterToSP.apply(x)``, on the default process group (dist.get_world_size(),
dist.get_rank()).

    dtlab check sequence_parallel --impl sequence_parallel.py

The checker runs on 2 processes (gloo) with random float64 activations, different on every rank,
and compares each function's output, and the gradient of its input for a random output gradient,
with the lab's own functions (labs/tensor_parallel.py), tolerance 1e-12.

Hints
- dist.all_gather_into_tensor(out, x) and dist.reduce_scatter_tensor(out, x) work along
  dimension 0 (the batch here): put the sequence first (x.transpose(0, 1).contiguous()) and
  back afterwards, or all_gather into a list and torch.cat(..., dim=1).
- The backward of an all-gather is NOT an all-reduce: that sums but keeps all T tokens (the
  input had T/W); reduce-scatter sums and keeps this rank's.
- Communication functions need no ctx.save_for_backward: they are linear.
"""
import torch
import torch.distributed as dist


class GatherFromSP(torch.autograd.Function):
    """[b, T/W, h] -> [b, T, h]: all-gather along the sequence; backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x):
        # TODO: all-gather along dimension 1, the ranks' pieces in rank order
        raise NotImplementedError("TODO: GatherFromSP.forward (all-gather along the sequence, "
                                  "dimension 1)")

    @staticmethod
    def backward(ctx, grad):
        # TODO: reduce-scatter along dimension 1: the sum, this rank's tokens
        raise NotImplementedError("TODO: GatherFromSP.backward (reduce-scatter along the "
                                  "sequence)")


class ReduceScatterToSP(torch.autograd.Function):
    """[b, T, h] partial sums -> this rank's [b, T/W, h] of their sum; backward all-gather."""

    @staticmethod
    def forward(ctx, x):
        # TODO: reduce-scatter along dimension 1
        raise NotImplementedError("TODO: ReduceScatterToSP.forward (reduce-scatter along the "
                                  "sequence)")

    @staticmethod
    def backward(ctx, grad):
        # TODO: all-gather along dimension 1
        raise NotImplementedError("TODO: ReduceScatterToSP.backward (all-gather along the "
                                  "sequence)")
