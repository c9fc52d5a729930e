"""Reference solution: Megatron sequence parallelism's all-gather / reduce-scatter pair."""
import torch
import torch.distributed as dist


def gather_sequence(x):
    """Every rank's [b, T/W, h] -> [b, T, h], rank r's tokens at [r T/W, (r+1) T/W)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)


def reduce_scatter_sequence(x):
    """Every rank's [b, T, h] -> this rank's [b, T/W, h] of their sum."""
    seq_first = x.transpose(0, 1).contiguous()  # reduce_scatter_tensor cuts dimension 0
    out = seq_first.new_empty((seq_first.shape[0] // dist.get_world_size(),
                               *seq_first.shape[1:]))
    dist.reduce_scatter_tensor(out, seq_first)
    return out.transpose(0, 1).contiguous()


class GatherFromSP(torch.autograd.Function):
    """[b, T/W, h] -> [b, T, h]: all-gather along the sequence; backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x):
        return gather_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sequence(grad)


class ReduceScatterToSP(torch.autograd.Function):
    """[b, T, h] partial sums -> this rank's [b, T/W, h] of their sum; backward all-gather."""

    @staticmethod
    def forward(ctx, x):
        return reduce_scatter_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        return gather_sequence(grad)
