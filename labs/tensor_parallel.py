"""Tensor (intra-layer) parallelism: every weight matrix cut across the ranks, Megatron style.

All TP ranks see the same batch and each holds a slice of every layer; a linear layer Y = X A^T
becomes
- column parallel: A cut by output rows, rank r computes Y_r = X A_r^T, its own slice of Y's
  columns; nothing to communicate in forward, but the gradient of X is a sum over ranks;
- row parallel: A cut by input columns, rank r computes X_r A_r^T from its slice of X, a partial
  sum; the full Y is the all-reduce of the partials.
Pairing them makes a block cost two all-reduces forward and two backward: attention's q/k/v are
column parallel (each rank owns n_head/TP whole heads, so attention itself needs no
communication) and its output projection row parallel; the MLP's fc is column parallel (GELU is
elementwise, so it applies to the slice) and its proj row parallel. The two autograd functions
that carry this are ``CopyToTP`` (forward identity, backward all-reduce: Megatron's f) and
``ReduceFromTP`` (forward all-reduce, backward identity: g); both take the TP process group and
the byte counter as arguments, so several TP groups (labs/parallel3d.py) can coexist.

``--sp`` adds Megatron's sequence parallelism. Between the row-parallel output and the next
column-parallel input (the residual stream, the LayerNorms) every TP rank holds the same whole
activation: TP-fold redundant memory and work. With ``--sp`` those regions are cut along the
sequence instead: rank r holds tokens [r T/TP, (r+1) T/TP) of the residual stream. The all-reduce
after a row-parallel layer becomes a reduce-scatter (each rank keeps the sum for its tokens
only), and the copy before a column-parallel layer becomes an all-gather of the LayerNorm's
output (``GatherFromSP``; backward reduce-scatter). An all-reduce is a reduce-scatter followed
by an all-gather, so the bytes are the same, in two collectives with work between them (plus
one all-gather in the backward of the embedding's entry into the SP region). The
LayerNorm parameters and the row-parallel biases now see only their rank's tokens: their
gradients are all-reduced over the TP group after the backward.

The LM head is column parallel over the vocabulary and the loss is computed without ever
gathering the logits: ``VocabParallelCrossEntropy`` all-reduces the row maxima, the sums of
exponentials and the target logits (3 floats per token), and its backward is softmax - one-hot on
each rank's own vocabulary slice.

``--impl torch`` applies the same plan with ``torch.distributed.tensor.parallel`` (DTensor):
``ColwiseParallel`` and ``RowwiseParallel`` on the same layers, the head gathering its logits.

Explained in docs/tensor-parallel.md (questions 5, 6 and 10 of docs/questions.md).

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
from dtlab.reliability import checkpoint as ckpt
from dtlab.measure.comm_counter import (CommCounter, flatten, library_collectives, nbytes, ring_sent_bytes,
                             unflatten_into)
from dtlab.train.grid import Grid
from dtlab.errors import UsageError
from dtlab.train.model import Embedding, ToyGPT, loss_fn
from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


def _all_reduce(t: torch.Tensor, group, counter: CommCounter, op=dist.ReduceOp.SUM):
    counter.record("all_reduce", t, sent_bytes=ring_sent_bytes(
        "all_reduce", nbytes(t), dist.get_world_size(group)))
    dist.all_reduce(t, op=op, group=group)
    return t


class CopyToTP(torch.autograd.Function):
    """f: the input of a column-parallel layer. Every rank uses the whole X, so X's gradient is
    the sum of the ranks' contributions."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous().clone(), ctx.group, ctx.counter), None, None


class ReduceFromTP(torch.autograd.Function):
    """g: the output of a row-parallel layer. The partial sums are added; the gradient of each
    partial is the gradient of the sum."""

    @staticmethod
    def forward(ctx, partial, group, counter):
        return _all_reduce(partial.contiguous().clone(), group, counter)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


# ---- sequence parallelism: the sequence is dimension 1 of [batch, seq, width]

def _gather_seq(x: torch.Tensor, group, counter: CommCounter) -> torch.Tensor:
    """[b, t/TP, h] on every rank -> [b, t, h], the ranks' pieces in rank order."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = torch.empty((xt.shape[0] * tp, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    counter.record("all_gather", out, sent_bytes=ring_sent_bytes("all_gather", nbytes(out), tp))
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()  # one copy, read by q, k and v alike


def _reduce_scatter_seq(x: torch.Tensor, group, counter: CommCounter) -> torch.Tensor:
    """[b, t, h] partial sums on every rank -> this rank's [b, t/TP, h] of their sum."""
    tp = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = torch.empty((xt.shape[0] // tp, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    counter.record("reduce_scatter", xt,
                   sent_bytes=ring_sent_bytes("reduce_scatter", nbytes(xt), tp))
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()


class GatherFromSP(torch.autograd.Function):
    """The input of a column-parallel layer under SP: all-gather the sequence; backward, each
    rank's gradient of the whole X is a partial sum, reduce-scattered to the tokens' owners."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return _gather_seq(x, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group, ctx.counter), None, None


class ReduceScatterToSP(torch.autograd.Function):
    """The output of a row-parallel layer under SP: the partial sums reduce-scattered along the
    sequence; backward, each rank needs the gradient of the whole output: all-gather."""

    @staticmethod
    def forward(ctx, partial, group, counter):
        ctx.group, ctx.counter = group, counter
        return _reduce_scatter_seq(partial, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad.contiguous(), ctx.group, ctx.counter), None, None


class ScatterToSP(torch.autograd.Function):
    """Enter the sequence-parallel region: keep this rank's tokens (no communication); backward,
    gather every rank's piece so the replicated embedding sees the gradient of all tokens."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        tp, r = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(tp, dim=1)[r].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad.contiguous(), ctx.group, ctx.counter), None, None


class EmbeddingThenScatter(Embedding):
    """The embedding (replicated) followed by the entry into the sequence-parallel region."""

    @classmethod
    def from_embedding(cls, emb: Embedding, group, counter) -> "EmbeddingThenScatter":
        """The same module (its parameters and positions), now entering the SP region."""
        emb.__class__ = cls
        emb.group, emb.counter = group, counter
        return emb

    def forward(self, idx):
        return ScatterToSP.apply(super().forward(idx), self.group, self.counter)


class LayerNormThenCopy(nn.LayerNorm):
    """A LayerNorm whose output feeds column-parallel layers: f sits here, once, even when
    several layers (q, k and v) read the same input (under SP: the all-gather of the sequence).
    Same parameter names as the LayerNorm it replaces, so shards map back to the baseline."""

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, group, counter,
                       sp: bool = False) -> "LayerNormThenCopy":
        new = cls(ln.normalized_shape, eps=ln.eps).to(ln.weight.device)
        new.load_state_dict(ln.state_dict())
        new.group, new.counter, new.sp = group, counter, sp
        return new

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
            EmbeddingThenScatter.from_embedding(layer, group, counter)
        elif 0 < i < last:  # a block
            a, m = layer.attn, layer.mlp
            layer.ln1 = LayerNormThenCopy.from_layernorm(layer.ln1, group, counter, sp)
            layer.ln2 = LayerNormThenCopy.from_layernorm(layer.ln2, group, counter, sp)
            for name in ("q", "k", "v"):
                setattr(a, name, ColumnParallelLinear(getattr(a, name), *span(cfg.d_model)))
                shard_dims[f"layers.{i}.attn.{name}.weight"] = 0
            a.proj = RowParallelLinear(a.proj, *span(cfg.d_model), group, counter, sp)
            m.fc = ColumnParallelLinear(m.fc, *span(cfg.d_ff))
            m.proj = RowParallelLinear(m.proj, *span(cfg.d_ff), group, counter, sp)
            shard_dims.update({f"layers.{i}.attn.proj.weight": 1, f"layers.{i}.mlp.fc.weight": 0,
                               f"layers.{i}.mlp.fc.bias": 0, f"layers.{i}.mlp.proj.weight": 1})
        elif i == last:  # the LM head, split by vocabulary
            layer.ln_f = LayerNormThenCopy.from_layernorm(layer.ln_f, group, counter, sp)
            vocab_lo, hi = span(cfg.vocab_size)
            layer.head = ColumnParallelLinear(layer.head, vocab_lo, hi)
            shard_dims[f"layers.{i}.head.weight"] = 0
    return shard_dims, vocab_lo


def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that see only this rank's tokens under SP (LayerNorms and row-parallel
    biases): their gradients are partial sums over the TP group."""
    return [p for n, p in model.named_parameters()
            if ".ln" in n or n.endswith("attn.proj.bias") or n.endswith("mlp.proj.bias")]


def vocab_parallel_loss(logits: torch.Tensor, y: torch.Tensor, vocab_lo: int, grid: Grid,
                        counter: CommCounter) -> torch.Tensor:
    """The loss of logits split by vocabulary over the TP group (plain ``loss_fn`` at TP 1)."""
    if grid.tp == 1:
        return loss_fn(logits, y)
    return VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           vocab_lo, grid.tp_group, counter)


def take_shard(full: torch.Tensor, dim: int, tp: int, t: int) -> torch.Tensor:
    """TP rank t's slice of a whole tensor cut along ``dim``, as ``shard_layers`` cuts it."""
    sizes = chunk_sizes(full.shape[dim], tp)
    return full.narrow(dim, sum(sizes[:t]), sizes[t])


def join_shards(local: dict, parts: list[dict], shard_dims: dict) -> dict:
    """``local`` with every sharded entry replaced by its TP shards (in TP rank order) joined."""
    out = dict(local)
    for name, dim in shard_dims.items():
        if name in out:
            out[name] = torch.cat([p[name] for p in parts], dim=dim)
    return out


class OwnTensorParallel(Strategy):
    name, variant = "tensor_parallel", "own"
    whole_batch = True          # every TP rank trains on the whole global batch

    def __init__(self, rt, settings, sp: bool = False):
        super().__init__(rt, settings)
        self.sp = sp
        if sp:
            self.variant = "own-sp"

    def build(self) -> None:
        self.grid = Grid(tp=self.rt.world_size, rank=self.rt.rank).with_groups(self.rt.timeout_s)
        self.model = ToyGPT(self.settings.model).to(self.rt.device)  # cut from the baseline's
        self.shard_dims, self.vocab_lo = shard_layers(  # init, layer by layer
            self.model, range(len(self.model.layers)), self.grid, self.comm, self.sp)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.extra.update(tp=self.grid.tp, sp=self.sp)

    def after_backward(self) -> None:
        """Under SP, the LayerNorms and row-parallel biases saw only this rank's tokens: sum
        their gradients over the TP group."""
        if not self.sp:
            return
        grads = [p.grad for p in sequence_parallel_params(self.model)]
        flat = flatten(grads)
        _all_reduce(flat, self.grid.tp_group, self.comm)
        unflatten_into(flat, grads)

    def forward_backward(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with self.meter.measure(self.model.parameters()):
            loss = vocab_parallel_loss(self.model(x), y, self.vocab_lo, self.grid, self.comm)
        loss.backward()
        return loss.detach()

    def _joined(self, local: dict, name_of=lambda key: key) -> dict:
        """Whole tensors on every rank: sharded entries concatenated along their dimension in
        TP rank order, replicated ones as this rank holds them."""
        dims = {k: self.shard_dims[name_of(k)] for k in local if name_of(k) in self.shard_dims}
        return join_shards(local, self.gather_object({k: local[k] for k in dims}), dims)

    def full_state(self):
        full = self._joined({n: p.detach().cpu() for n, p in self.model.named_parameters()})
        return full if self.rt.is_main else None

    def canonical_state(self) -> dict:
        local = ckpt.adam_named(dict(self.model.named_parameters()), self.optimizer)
        return self._joined(local, ckpt.param_of)

    def load_canonical_state(self, full: dict) -> None:
        g, dims = self.grid, self.shard_dims
        ckpt.load_adam_named(dict(self.model.named_parameters()), self.optimizer, full,
                             cut=lambda n, t: take_shard(t, dims[n], g.tp, g.t) if n in dims else t)


class TorchTensorParallel(Strategy):
    """The same plan through DTensor's parallelize_module."""

    name, variant = "tensor_parallel", "torch"
    whole_batch = True

    def build(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        tp = self.rt.world_size
        model = ToyGPT(self.settings.model).to(self.rt.device)
        mesh = init_device_mesh(self.rt.device.type, (tp,))
        plan = {}
        for i in range(1, len(model.layers) - 1):
            for name in ("q", "k", "v"):
                plan[f"layers.{i}.attn.{name}"] = ColwiseParallel()
            plan[f"layers.{i}.attn.proj"] = RowwiseParallel()
            plan[f"layers.{i}.mlp.fc"] = ColwiseParallel()
            plan[f"layers.{i}.mlp.proj"] = RowwiseParallel()
        plan[f"layers.{len(model.layers) - 1}.head"] = ColwiseParallel(
            output_layouts=Replicate())  # gather the logits; the loss is the ordinary one
        self.model = parallelize_module(model, mesh, plan)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.extra["tp"] = tp

    def forward_backward(self, x, y):
        from torch.distributed.tensor.debug import CommDebugMode
        self.optimizer.zero_grad(set_to_none=True)
        # DTensor issues its collectives itself: CommDebugMode names them, library_collectives
        # counts their bytes at the dispatcher.
        with CommDebugMode() as comm_mode, library_collectives(self.comm), \
                self.meter.measure(self.model.parameters()):
            loss = loss_fn(self.model(x), y)
            loss.backward()
        self.extra["dtensor_comm_counts_per_step"] = {
            str(op).split(".")[-1]: n for op, n in comm_mode.get_comm_counts().items()}
        return loss.detach()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.tensor_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", "torch"])
    p.add_argument("--sp", action="store_true",
                   help="sequence parallelism: LayerNorms and the residual stream cut along the "
                        "sequence (own implementation)")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    Grid(tp=world).validate(world, settings.model, settings.batch_size, preset=settings.preset)
    if args.sp and world == 1:
        raise UsageError("--sp cuts the sequence over the tensor parallel ranks: run with "
                         "--nproc 2 or more")
    if args.sp and args.impl != "own":
        raise UsageError("--sp is written out in --impl own only; drop --impl torch")
    if args.sp and settings.model.seq_len % world:
        raise UsageError(f"--sp: the sequence length {settings.model.seq_len} is not divisible "
                         f"by the tensor parallel size {world}; use a TP size that divides it")


def make_strategy(rt, settings, args) -> Strategy:
    if args.impl == "torch":
        return TorchTensorParallel(rt, settings)
    return OwnTensorParallel(rt, settings, sp=args.sp)


def main(argv=None) -> int:
    return run_lab(registry.get("tensor_parallel"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
