"""Exercise: column- and row-parallel linear layers (docs/tensor-parallel.md,
labs/tensor_parallel.py).

An MLP is fc (hidden -> 4 hidden) then proj (4 hidden -> hidden). Megatron cuts fc by its output
features (column parallel: each rank computes a slice of the hidden activations, no
communication) and proj by its input features (row parallel: each rank multiplies its slice and
one all-reduce sums the partial products). The element-wise activation in between needs nothing.

Both functions get the FULL weight and bias and must use only this rank's part of them.

    dtlab check tensor_parallel --impl tensor_parallel.py

The checker runs on 2 and 4 processes and compares each rank's column output with the matching
slice of the full layer's output, and the row layer's output with the full MLP's.

Hints
- nn.Linear computes x @ weight.T + bias; weight has shape (out_features, in_features).
- Column parallel: rank r keeps rows r*out/W ... (r+1)*out/W of weight and the same slice of bias.
- Row parallel: rank r keeps columns r*in/W ... (r+1)*in/W of weight; add the bias once, after
  the all-reduce (adding it on every rank would count it W times).
"""
import torch
import torch.distributed as dist


def column_parallel_forward(x, weight, bias, rank, world):
    """This rank's slice of x @ weight.T + bias: output features rank*out/W ... (rank+1)*out/W."""
    # TODO: slice weight's rows and bias, then one matmul
    raise NotImplementedError("TODO: column_parallel_forward (keep this rank's rows of weight)")


def row_parallel_forward(x_local, weight, bias, rank, world):
    """The full x @ weight.T + bias from this rank's slice of the input features."""
    # TODO: slice weight's columns, multiply, all-reduce the partial products, add the bias
    raise NotImplementedError("TODO: row_parallel_forward (this rank's columns, all-reduce, "
                              "then bias)")
