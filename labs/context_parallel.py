"""Context parallelism: the sequence cut over ranks, attention computed as a ring.

Every layer of the model but one works token by token (embedding, LayerNorm, the MLP, the
projections), so W ranks can each hold T/W tokens of every sequence and run them alone. The
exception is attention: the queries of rank r need the keys and values of every earlier token.
Ring attention brings them without ever gathering the whole sequence:

    out, lse = 0, -inf                            # per query row: output so far, log-sum-exp
    kv = my (K, V)
    for step in 0 .. W-1:                         # kv now holds rank (r - step)'s block
        start sending kv to rank r+1, receiving the next block from rank r-1
        o, l = attention of my queries against kv (causal mask by global positions)
        out, lse = merge(out, lse, o, l)          # online softmax
        wait for the next block
    merge:  lse' = log(e^lse + e^l);   out' = e^(lse - lse') out + e^(l - lse') o

Each block's partial output is normalised by its own softmax sum; rescaling by e^(lse - lse')
puts both on the common denominator, so the result is the attention over all keys, exactly (up
to rounding). The backward sends the blocks around the ring again, and with them the gradients of
K and V, which travel back to their owners (one more hop). The message of step s+1 is in flight
while step s computes: with enough tokens per rank the ring costs no time beyond the attention.

Causal masking makes the contiguous split unfair (rank W-1's queries see every key, rank 0's only
its own); the zig-zag layout gives rank r chunks r and 2W-1-r of 2W, an early and a late one, so
every rank does the same work. ``--layout`` picks either; the run records each rank's attention
work (score entries computed) and which rank computes each block of the causal score matrix at
which ring step (``ring_blocks``, drawn as ``ring.png`` by dtlab/report/ring_picture.py). The
parameters are replicated: their gradients are averaged over the ranks after the backward.
``--impl torch`` (torch's experimental context_parallel) shards only CUDA attention kernels: the
lab says so and stops. Explained in docs/context-parallel.md.

Run:
    torchrun --nproc_per_node=2 -m labs.context_parallel --preset long --steps 5
    dtlab run context_parallel --nproc 4 --preset long --layout contiguous
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.costmodel.ring_attention import ring_attention_bytes
from dtlab.errors import UsageError
from dtlab.harness import add_common_args, run_lab
from dtlab.measure.comm_counter import CommCounter, flatten, nbytes, ring_sent_bytes, unflatten_into
from dtlab.train.loop import Strategy
from dtlab.train.model import ToyGPT

KV_TAG, DKV_TAG = 4000, 5000  # message tags, apart from the pipeline's (labs/parallel3d.py)


# --------------------------------------------------------------------------- the layout

def layout_chunks(seq: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """The [lo, hi) ranges of global positions rank ``rank`` holds."""
    if layout == "contiguous":
        n = seq // world
        return [(rank * n, (rank + 1) * n)]
    n = seq // (2 * world)  # zig-zag: chunk r and its mirror 2W-1-r
    return [(rank * n, (rank + 1) * n), ((2 * world - 1 - rank) * n, (2 * world - rank) * n)]


def positions(chunks: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(lo, hi) for lo, hi in chunks])


def block_pairs(q_chunks, k_chunks) -> list[tuple[slice, slice, torch.Tensor | None]]:
    """(query slice, key slice, causal mask or None) for every pair of chunks where some query
    sees some key. Local slices index the concatenated chunks of each side."""
    out, qo = [], 0
    for qlo, qhi in q_chunks:
        ko = 0
        for klo, khi in k_chunks:
            qs, ks = slice(qo, qo + qhi - qlo), slice(ko, ko + khi - klo)
            if khi - 1 <= qlo:           # every key precedes every query: no mask
                out.append((qs, ks, None))
            elif klo <= qhi - 1:         # overlapping ranges: mask by position
                qp, kp = torch.arange(qlo, qhi), torch.arange(klo, khi)
                out.append((qs, ks, qp[:, None] >= kp[None, :]))
            ko += khi - klo
        qo += qhi - qlo
    return out


def ring_schedule(chunks: list) -> list[list[int]]:
    """Every block the ring computes: [rank, step, q_lo, q_hi, k_lo, k_hi] in global positions
    (for the record; ``block_pairs`` of rank r's chunks against those of rank r - step)."""
    w, out = len(chunks), []
    for r in range(w):
        for step in range(w):
            qp, kp = positions(chunks[r]).tolist(), positions(chunks[(r - step) % w]).tolist()
            out += [[r, step, qp[q.start], qp[q.stop - 1] + 1, kp[k.start], kp[k.stop - 1] + 1]
                    for q, k, _ in block_pairs(chunks[r], chunks[(r - step) % w])]
    return out


# --------------------------------------------------------------------------- one block

def block_attention(q, k, v, mask, scale):
    """Softmax attention of q against one key block: (output normalised within the block, its
    log-sum-exp per query row)."""
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # a row seeing no key: 0
    return torch.exp(s - shift[..., None]) @ v, lse


def merge(out, lse, o, lse_o):
    """Online softmax: fold a block's (o, lse_o) into the running (out, lse)."""
    new = torch.logaddexp(lse, lse_o)
    new_safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    return (torch.exp(lse - new_safe)[..., None] * out
            + torch.exp(lse_o - new_safe)[..., None] * o), new


# --------------------------------------------------------------------------- the ring

@dataclass
class Ring:
    """What a rank's ring attention needs: its context-parallel group, every rank's chunks, the
    byte counter and a tally of the attention work done (score entries, forward)."""
    group: object
    chunks: list                     # chunks[i]: the position ranges rank i of the group holds
    counter: CommCounter
    work: dict = field(default_factory=lambda: {"entries": 0})  # one layer's forward

    def __post_init__(self):
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def shift(self, send: torch.Tensor, tag: int):
        """Start passing ``send`` to the next rank and receiving the previous rank's."""
        recv = torch.empty_like(send)
        self.counter.record("send", send, sent_bytes=nbytes(send))
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, tag=tag),
                                       dist.P2POp(dist.irecv, recv, self.prev, tag=tag)])
        return recv, reqs


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring):
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        kv = torch.stack([k, v])
        mine, entries = ring.chunks[ring.rank], 0
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world           # whose block kv holds now
            if step < ring.world - 1:
                nxt, reqs = ring.shift(kv, KV_TAG + step)   # in flight while we compute
            for qs, ks, mask in block_pairs(mine, ring.chunks[src]):
                o, lo = block_attention(q[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :],
                                        mask, scale)
                out[..., qs, :], lse[..., qs] = merge(out[..., qs, :], lse[..., qs], o, lo)
                entries += (qs.stop - qs.start) * (ks.stop - ks.start)
            if step < ring.world - 1:
                _wait(reqs)
                kv = nxt
        ring.work["entries"] = entries
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = ctx.ring, 1.0 / math.sqrt(q.shape[-1])
        dout = dout.contiguous()
        delta = (dout * out).sum(-1)                         # D_i = sum_j dO_ij O_ij
        dq = torch.zeros_like(q)
        kv, dkv, dkv_reqs = torch.stack([k, v]), None, []
        mine = ring.chunks[ring.rank]
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            if step < ring.world - 1:
                nxt, reqs = ring.shift(kv, KV_TAG + step)
            mine_dkv = torch.zeros_like(kv)  # this rank's share; the block's so far is arriving
            for qs, ks, mask in block_pairs(mine, ring.chunks[src]):
                kb, vb = kv[0][..., ks, :], kv[1][..., ks, :]
                s = (q[..., qs, :] @ kb.transpose(-2, -1)) * scale
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                p = torch.exp(s - lse[..., qs, None])          # the softmax, recomputed
                dv = p.transpose(-2, -1) @ dout[..., qs, :]
                ds = p * (dout[..., qs, :] @ vb.transpose(-2, -1) - delta[..., qs, None])
                dq[..., qs, :] += (ds @ kb) * scale
                mine_dkv[0][..., ks, :] += (ds.transpose(-2, -1) @ q[..., qs, :]) * scale
                mine_dkv[1][..., ks, :] += dv
            if step < ring.world - 1:
                _wait(reqs)
                kv = nxt
            _wait(dkv_reqs)  # the gradients of this block from the ranks before us
            dkv = mine_dkv if dkv is None else dkv + mine_dkv
            # this block's K/V gradients travel on with it; after the last step, home
            dkv, dkv_reqs = ring.shift(dkv, DKV_TAG + step)
        _wait(dkv_reqs)
        return dq, dkv[0], dkv[1], None


def ring_attention(ring: Ring):
    """An attention core (``Attention.core``) that runs ring attention over ``ring``."""
    return lambda q, k, v: RingAttention.apply(q, k, v, ring)


# --------------------------------------------------------------------------- the strategy

def cut_sequence(model: ToyGPT, ring: Ring) -> torch.Tensor:
    """Put ring attention into every block of ``model`` and tell its embedding which positions
    it holds; returns those positions."""
    pos = positions(ring.chunks[ring.rank]).to(model.layers[0].pos.weight.device)
    model.layers[0].positions = pos
    for block in model.layers[1:-1]:
        block.attn.core = ring_attention(ring)
    return pos


class ContextParallel(Strategy):
    name = "context_parallel"

    def __init__(self, rt, settings, layout: str):
        super().__init__(rt, settings)
        self.layout, self.variant = layout, f"ring-{layout}"

    def build(self) -> None:
        w, seq = self.rt.world_size, self.settings.model.seq_len
        self.model = ToyGPT(self.settings.model).to(self.rt.device)
        self.ring = Ring(dist.group.WORLD,
                         [layout_chunks(seq, w, r, self.layout) for r in range(w)], self.comm)
        self.pos = cut_sequence(self.model, self.ring)
        self.optimizer = self.make_optimizer(self.model.parameters())
        cfg = self.settings.model
        redo = sum(cfg.recomputes(i) for i in range(cfg.n_layer))  # blocks that send K/V again
        self.extra.update(cp=w, layout=self.layout, chunks=self.ring.chunks[self.rt.rank],
                          ring_blocks=ring_schedule(self.ring.chunks), send_bytes_theory=
                          ring_attention_bytes(cfg, self.settings.batch_size, w, redo)["send"])

    def local_batch(self, x, y):
        """Every row of the global batch, this rank's tokens of each."""
        return x[:, self.pos], y[:, self.pos]

    def after_backward(self) -> None:
        """Each rank's gradients come from its own tokens: average them over the ranks."""
        grads = [p.grad for p in self.model.parameters()]
        flat = flatten(grads)
        w = self.rt.world_size
        self.comm.record("all_reduce", flat,
                         sent_bytes=ring_sent_bytes("all_reduce", nbytes(flat), w))
        dist.all_reduce(flat)
        unflatten_into(flat.div_(w), grads)

    def memory(self) -> dict:
        m = super().memory()
        m["attention_entries"] = self.ring.work["entries"]  # one layer's forward, per row/head
        return m


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.context_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="own", choices=["own", "torch"])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"],
                   help="zigzag: rank r holds chunks r and 2W-1-r of 2W (balanced causal work; "
                        "default); contiguous: chunk r of W")
    return add_common_args(p)


def check_args(args, settings, world: int) -> None:
    if args.impl == "torch":
        raise UsageError(
            "--impl torch: torch.distributed.tensor.experimental.context_parallel shards only "
            "the CUDA flash and memory-efficient SDPA kernels, not the CPU one; run --impl own "
            "here, or --impl torch on GPUs")
    pieces = world * (2 if args.layout == "zigzag" else 1)
    if settings.model.seq_len % pieces:
        raise UsageError(f"--layout {args.layout}: the sequence length {settings.model.seq_len}"
                         f" must divide into {pieces} equal chunks at {world} ranks; give "
                         f"--seq-len a multiple of {pieces}")


def make_strategy(rt, settings, args) -> Strategy:
    return ContextParallel(rt, settings, args.layout)


def main(argv=None) -> int:
    return run_lab(registry.get("context_parallel"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
