"""Reference solution: column- and row-parallel linear layers (Megatron style)."""
import torch
import torch.distributed as dist


def column_parallel_forward(x, weight, bias, rank, world):
    """This rank's slice of x @ weight.T + bias: output features rank*out/W ... (rank+1)*out/W."""
    per = weight.shape[0] // world
    rows = slice(rank * per, (rank + 1) * per)
    return x @ weight[rows].T + bias[rows]


def row_parallel_forward(x_local, weight, bias, rank, world):
    """The full x @ weight.T + bias from this rank's slice of the input features."""
    per = weight.shape[1] // world
    cols = slice(rank * per, (rank + 1) * per)
    partial = x_local @ weight[:, cols].T
    dist.all_reduce(partial)  # sum of every rank's partial product
    return partial + bias
