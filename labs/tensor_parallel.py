"""Tensor (intra-layer) parallelism: every weight matrix cut across the ranks, Megatron style.

All TP ranks see the same batch and each holds a slice of every layer. For Y = X A^T, a column
parallel layer cuts A by output rows (rank r computes its own columns of Y; X's gradient is a
sum over the ranks), a row parallel one by input columns (rank r computes a partial sum, which
is all-reduced into Y). A block pairs them: q/k/v column parallel (n_head/TP whole heads a rank,
so attention needs no communication) before the attention's row-parallel output projection, the
MLP's fc (GELU is elementwise) before its proj: two all-reduces forward and two backward, in the
conjugate functions f and g below. The LM head is cut by vocabulary and the loss never gathers
the logits (``VocabParallelCrossEntropy``). Explained in docs/tensor-parallel.md.

``--sp`` adds sequence parallelism (docs/sequence-parallel.md): between a row-parallel output and
the next column-parallel input (the residual stream, the LayerNorms) rank r holds only tokens
[r T/TP, (r+1) T/TP); g becomes a reduce-scatter along the sequence and f an all-gather, the same
bytes in two collectives with work between them. ``--impl torch`` applies the same plan with
DTensor (labs/library/dtensor_tensor_parallel.py).

Run:
    torchrun --nproc_per_node=2 -m labs.tensor_parallel --steps 10
    dtlab run tensor_parallel --nproc 4 --preset small --impl torch
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dtlab import registry
from dtlab.collectives.ring import chunk_sizes
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.measure.comm_counter import (CommCounter, flatten, nbytes, ring_sent_bytes,
                                        unflatten_into)
from dtlab.train.grid import Grid
from dtlab.train.layout import ParamLayout
from dtlab.train.loop import Strategy
from dtlab.train.model import Embedding, ToyGPT, loss_fn


def _all_reduce(t: torch.Tensor, group, counter: CommCounter, op=dist.ReduceOp.SUM):
    counter.record("all_reduce", t, sent_bytes=ring_sent_bytes(
        "all_reduce", nbytes(t), dist.get_world_size(group)))
    dist.all_reduce(t, op=op, group=group)
    return t


def _sum(x, group, counter):
    """The sum over the TP group of every rank's ``x`` (a copy: ``x`` is left as it was)."""
    return _all_reduce(x.contiguous().clone(), group, counter)


def _same(x, group, counter):
    return x


def _gather_seq(x, group, counter):
    """Under SP, [b, t/TP, h] on every rank -> [b, t, h], the ranks' pieces in rank order."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = torch.empty((xt.shape[0] * tp, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    counter.record("all_gather", out, sent_bytes=ring_sent_bytes("all_gather", nbytes(out), tp))
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()  # one copy, read by q, k and v alike


def _reduce_scatter_seq(x, group, counter):
    """[b, t, h] partial sums on every rank -> this rank's [b, t/TP, h] of their sum."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = torch.empty((xt.shape[0] // tp, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    counter.record("reduce_scatter", xt,
                   sent_bytes=ring_sent_bytes("reduce_scatter", nbytes(xt), tp))
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()


def _my_tokens(x, group, counter):
    return x.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)].contiguous()


def conjugate(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd function doing ``forward(x, group, counter)`` and, to the gradient,
    ``backward(grad, group, counter)``: each of the pairs below is one row of Megatron's table."""

    def fwd(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return forward(x, group, counter)

    def bwd(ctx, grad):
        return backward(grad, ctx.group, ctx.counter), None, None
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# f, before a column-parallel layer: every rank reads the whole X, so X's gradient is the sum
# of the ranks' parts. g, after a row-parallel layer: the partial sums are added, and each
# partial's gradient is the sum's. Under SP, f gathers the sequence (the whole X's gradient is
# a partial sum, reduce-scattered to the tokens' owners) and g reduce-scatters it; the
# embedding's output enters the SP region by keeping this rank's tokens.
CopyToTP = conjugate("CopyToTP", _same, _sum)
ReduceFromTP = conjugate("ReduceFromTP", _sum, _same)
GatherFromSP = conjugate("GatherFromSP", _gather_seq, _reduce_scatter_seq)
ReduceScatterToSP = conjugate("ReduceScatterToSP", _reduce_scatter_seq, _gather_seq)
ScatterToSP = conjugate("ScatterToSP", _my_tokens, _gather_seq)


# --------------------------------------------------------------------------- the layers

def _then(module: nn.Module, cls: type, group, counter, sp: bool = False) -> None:
    """``module`` itself (its parameters, so their baseline names) turned into ``cls``: the same
    layer followed by f or by the entry into the SP region."""
    module.__class__ = cls
    module.group, module.counter, module.sp = group, counter, sp


class EmbeddingThenScatter(Embedding):
    """The embedding (replicated) followed by the entry into the sequence-parallel region."""

    def forward(self, idx):
        return ScatterToSP.apply(super().forward(idx), self.group, self.counter)


class LayerNormThenCopy(nn.LayerNorm):
    """A LayerNorm whose output feeds column-parallel layers: f sits here, once, even when
    several layers (q, k and v) read the same input (under SP: the all-gather of the sequence)."""

    def forward(self, x):
        enter = GatherFromSP if self.sp else CopyToTP
        return enter.apply(super().forward(x), self.group, self.counter)


class ColumnParallelLinear(nn.Module):
    """Rows [lo, hi) of a full Linear's weight (and bias): this rank's output features. Its
    input must come through f (``LayerNormThenCopy``)."""

    def __init__(self, full: nn.Linear, lo: int, hi: int):
        super().__init__()
        self.in_features, self.out_features = full.in_features, full.out_features
        self.weight = nn.Parameter(full.weight.detach()[lo:hi].clone())
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach()[lo:hi].clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Columns [lo, hi) of a full Linear's weight: this rank's input features. The bias is
    whole and added once, after the all-reduce."""

    def __init__(self, full: nn.Linear, lo: int, hi: int, group, counter, sp: bool = False):
        super().__init__()
        self.in_features, self.out_features = full.in_features, full.out_features
        self.weight = nn.Parameter(full.weight.detach()[:, lo:hi].clone())
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())
        self.group, self.counter, self.sp = group, counter, sp

    def forward(self, x_local):
        leave = ReduceScatterToSP if self.sp else ReduceFromTP
        y = leave.apply(F.linear(x_local, self.weight), self.group, self.counter)
        return y if self.bias is None else y + self.bias


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over N tokens from logits split by vocabulary: [N, V_r] on rank r
    holding vocabulary ids [lo, lo + V_r)."""

    @staticmethod
    def forward(ctx, logits, target, lo, group, counter):
        logits = logits.float()
        row_max = _all_reduce(logits.max(dim=1).values, group, counter, op=dist.ReduceOp.MAX)
        shifted = logits - row_max[:, None]
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=1), group, counter)
        mine = (target >= lo) & (target < lo + logits.shape[1])
        local_t = (target - lo).clamp(0, logits.shape[1] - 1)
        target_logit = torch.where(mine, shifted.gather(1, local_t[:, None])[:, 0],
                                   torch.zeros_like(row_max))
        target_logit = _all_reduce(target_logit, group, counter)
        ctx.save_for_backward(exp / sum_exp[:, None], mine, local_t)
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, mine, local_t = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows[mine], local_t[mine]] -= 1.0
        return g * (grad / g.shape[0]), None, None, None, None


# --------------------------------------------------------------------------- the cut

def shard_layers(full: ToyGPT, indices, grid: Grid, counter: CommCounter,
                 sp: bool = False) -> tuple[dict, int]:
    """Replace, in place, the layers ``full.layers[i]`` for i in ``indices`` by TP rank
    ``grid.t``'s shards (communicating in ``grid.tp_group``; ``sp``: with sequence parallelism).
    Returns {parameter name: dimension it is cut along} and the first vocabulary id of this
    rank's slice of the LM head (0 when the head is not among the layers)."""
    shard_dims, vocab_lo = {}, 0
    tp, r, group = grid.tp, grid.t, grid.tp_group
    if tp == 1:
        return shard_dims, vocab_lo
    cfg, last = full.cfg, len(full.layers) - 1

    def span(n: int) -> tuple[int, int]:
        sizes = chunk_sizes(n, tp)
        return sum(sizes[:r]), sum(sizes[:r + 1])

    for i in indices:
        layer = full.layers[i]
        if i == 0 and sp:
            _then(layer, EmbeddingThenScatter, group, counter)
        elif 0 < i < last:  # a block
            a, m = layer.attn, layer.mlp
            for ln in (layer.ln1, layer.ln2):
                _then(ln, LayerNormThenCopy, group, counter, sp)
            for name in ("q", "k", "v"):
                setattr(a, name, ColumnParallelLinear(getattr(a, name), *span(cfg.d_model)))
                shard_dims[f"layers.{i}.attn.{name}.weight"] = 0
            a.proj = RowParallelLinear(a.proj, *span(cfg.d_model), group, counter, sp)
            m.fc = ColumnParallelLinear(m.fc, *span(cfg.d_ff))
            m.proj = RowParallelLinear(m.proj, *span(cfg.d_ff), group, counter, sp)
            shard_dims.update({f"layers.{i}.attn.proj.weight": 1, f"layers.{i}.mlp.fc.weight": 0,
                               f"layers.{i}.mlp.fc.bias": 0, f"layers.{i}.mlp.proj.weight": 1})
        elif i == last:  # the LM head, split by vocabulary
            _then(layer.ln_f, LayerNormThenCopy, group, counter, sp)
            vocab_lo, hi = span(cfg.vocab_size)
            layer.head = ColumnParallelLinear(layer.head, vocab_lo, hi)
            shard_dims[f"layers.{i}.head.weight"] = 0
    return shard_dims, vocab_lo


def vocab_parallel_loss(logits: torch.Tensor, y: torch.Tensor, vocab_lo: int, grid: Grid,
                        counter: CommCounter) -> torch.Tensor:
    """The loss of logits split by vocabulary over the TP group (plain ``loss_fn`` at TP 1)."""
    if grid.tp == 1:
        return loss_fn(logits, y)
    return VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           vocab_lo, grid.tp_group, counter)


# --------------------------------------------------------------------------- the strategy

class OwnTensorParallel(Strategy):
    name, variant = "tensor_parallel", "own"
    whole_batch = True          # every TP rank trains on the whole global batch

    def __init__(self, rt, settings, sp: bool = False):
        super().__init__(rt, settings)
        self.sp, self.variant = sp, "own-sp" if sp else "own"

    def build(self) -> None:
        self.grid = Grid(tp=self.rt.world_size, rank=self.rt.rank).with_groups(self.rt.timeout_s)
        self.model = ToyGPT(self.settings.model).to(self.rt.device)  # cut from the baseline's
        self.shard_dims, self.vocab_lo = shard_layers(  # init, layer by layer
            self.model, range(len(self.model.layers)), self.grid, self.comm, self.sp)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.extra.update(tp=self.grid.tp, sp=self.sp)

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with self.meter.measure(self.model.parameters()):
            loss = vocab_parallel_loss(self.model(x), y, self.vocab_lo, self.grid, self.comm)
        loss.backward()
        return loss.detach()

    def after_backward(self) -> None:
        """Under SP, the LayerNorms and row-parallel biases saw only this rank's tokens: sum
        their gradients over the TP group."""
        if self.sp:
            grads = [p.grad for n, p in self.model.named_parameters()
                     if ".ln" in n or n.endswith(("attn.proj.bias", "mlp.proj.bias"))]
            flat = flatten(grads)
            _all_reduce(flat, self.grid.tp_group, self.comm)
            unflatten_into(flat, grads)

    def param_layout(self) -> ParamLayout:
        """The baseline's names; the cut tensors are TP rank t's slice along ``shard_dims``."""
        return ParamLayout(dict(self.model.named_parameters()), split=self.shard_dims,
                           tp=self.grid.tp, tp_rank=self.grid.t)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.tensor_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", "torch"])
    p.add_argument("--sp", action="store_true",
                   help="sequence parallelism: LayerNorms and the residual stream cut along the "
                        "sequence (own implementation)")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    Grid(tp=world).validate(world, settings.model, settings.batch_size, preset=settings.preset)
    seq = settings.model.seq_len
    if args.sp and world == 1:
        raise UsageError("--sp cuts the sequence over the tensor parallel ranks: run with "
                         "--nproc 2 or more")
    if args.sp and args.impl != "own":
        raise UsageError("--sp is written out in --impl own only; drop --impl torch")
    if args.sp and seq % world:
        raise UsageError(f"--sp: the sequence length {seq} is not divisible by the tensor "
                         f"parallel size {world}; use a TP size that divides it")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl != "own":
        return registry.get("tensor_parallel").library_strategy(args.impl)(rt, settings)
    return OwnTensorParallel(rt, settings, sp=args.sp)


def main(argv=None) -> int:
    return run_lab(registry.get("tensor_parallel"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
