"""Expert parallelism: a mixture-of-experts model with its experts spread over ranks, tokens sent
to them and back with all-to-all.

With ``--moe-experts E`` every block's MLP is a mixture of E experts (``MoE`` in
dtlab/train/model.py): a router picks each token's top K experts, and the token's output is their
outputs weighted by the router's probabilities. The experts are most of the parameters but each
token uses only K of them, so they are the part to spread: with EP ranks, rank j holds experts
[j E/EP, (j+1) E/EP), and every rank keeps the rest of the model (attention, router, embeddings)
whole and trains it on its own rows, as data parallelism does. Per MoE layer and step:

    route my tokens                             router, top K, assignments grouped by expert
    all-to-all the counts                       how many rows each rank will receive for each
                                                of its experts (uneven: routing decides)
    all-to-all the rows                         every assignment to the rank that has its expert
    run my experts on what arrived              rows regrouped by expert, then back in order
    all-to-all the outputs back                 the reverse split
    combine                                     out = sum over the K experts of p_e * expert_e(x)

Both all-to-alls are autograd functions whose backward is the all-to-all with the splits
swapped. The load-balancing loss (E * sum_e f_e P_e) needs f_e, the share of assignments over
the whole global batch: the counts are all-reduced, so every rank's gradient of the loss is its
share of the one-process gradient, and the run equals the baseline. ``--dp D`` replicates the
expert shards: W = EP x D ranks, rank = d EP + j, the experts' gradients averaged over the D
ranks holding the same shard.

``--capacity-factor C`` caps what each rank sends to one expert at ceil(C K n / E) rows for its n
tokens; the rest are dropped (their share of the output is zero, the residual carries them). The
one-process model drops nothing, so a run that drops is reported as not equivalent, with the
number dropped, rather than judged against it.

The run records the tokens every expert received in every layer and step
(``extra.tokens_per_expert``; ``dtlab run`` draws them as ``experts.png``, through
dtlab/report/pictures.py); dtlab/costmodel/experts.py has the all-to-all bytes the routing
implies. Explained in docs/expert-parallel.md.

Run:
    torchrun --nproc_per_node=2 -m labs.expert_parallel --moe-experts 4 --moe-top-k 2
    dtlab run expert_parallel --nproc 4 --ep 2 --dp 2 --moe-experts 4 --moe-top-k 2
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.measure.comm_counter import CommCounter, flatten, nbytes, ring_sent_bytes, unflatten_into
from dtlab.errors import UsageError
from dtlab.train.model import MoE, ToyGPT
from dtlab.train.settings import finite
from dtlab.harness import add_common_args, run_lab
from dtlab.train.layout import ParamLayout
from dtlab.train.loop import Strategy


class AllToAll(torch.autograd.Function):
    """Rows ``send[j]`` to rank j of ``group``, ``recv[j]`` from it; backward, the reverse."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group, counter: CommCounter):
        ctx.send, ctx.recv, ctx.group, ctx.counter = send, recv, group, counter
        return _all_to_all(x, send, recv, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.recv, ctx.send, ctx.group,
                           ctx.counter), None, None, None, None


def _all_to_all(x, send, recv, group, counter):
    out = x.new_empty((sum(recv), *x.shape[1:]))
    me = dist.get_rank(group)
    row = math.prod(x.shape[1:]) * x.element_size()  # from the shape: a rank may send no rows
    counter.record("all_to_all", nbytes(x),
                   sent_bytes=row * sum(n for j, n in enumerate(send) if j != me))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class ExpertShard:
    """This rank's experts of one MoE layer and the all-to-alls that feed them; installed as the
    layer's ``run_experts``. ``dropped`` counts the assignments the capacity cut."""

    def __init__(self, moe: MoE, group, counter: CommCounter, capacity_factor: float | None):
        self.moe, self.group, self.counter, self.cf = moe, group, counter, capacity_factor
        self.ep, self.j = dist.get_world_size(group), dist.get_rank(group)
        self.per = moe.n_experts // self.ep
        mine = range(self.j * self.per, (self.j + 1) * self.per)
        # the same expert modules under the same names ("experts.3.fc.weight"), mine only
        moe.experts = torch.nn.ModuleDict({str(e): moe.experts[e] for e in mine})
        moe.run_experts = self.run
        self.dropped, self.sent_rows = 0, []

    def run(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        keep = counts
        if self.cf is not None:  # each expert takes at most `cap` of this rank's rows
            n = rows.shape[0] // self.moe.top_k
            cap = math.ceil(self.cf * self.moe.top_k * n / self.moe.n_experts)
            keep = [min(c, cap) for c in counts]
            self.dropped += sum(counts) - sum(keep)
            starts = [sum(counts[:e]) for e in range(len(counts))]
            rows = torch.cat([rows[s:s + k] for s, k in zip(starts, keep)])
        cnt = torch.tensor(keep, dtype=torch.int64).view(self.ep, self.per)  # [rank, its expert]
        got = torch.empty_like(cnt)
        self.counter.record("all_to_all", cnt, sent_bytes=(self.ep - 1) * self.per * 8)
        dist.all_to_all_single(got, cnt, group=self.group)          # [source rank, my expert]
        send, recv = cnt.sum(1).tolist(), got.sum(1).tolist()
        self.sent_rows.append([send, recv])
        x = AllToAll.apply(rows, send, recv, self.group, self.counter)
        pieces = x.split(got.flatten().tolist())                     # (source, expert) order
        outs = []
        for e in range(self.per):                                   # my experts, all sources
            mine = torch.cat([pieces[s * self.per + e] for s in range(self.ep)])
            outs.append(self.moe.experts[str(self.j * self.per + e)](mine)
                        .split(got[:, e].tolist()))
        back = torch.cat([outs[e][s] for s in range(self.ep) for e in range(self.per)])
        y = AllToAll.apply(back, recv, send, self.group, self.counter)
        if keep is counts:
            return y
        out, at, pos = rows.new_zeros((sum(counts), y.shape[1])), 0, 0
        for c, k in zip(counts, keep):                               # dropped rows stay zero
            out[pos:pos + k] = y[at:at + k]
            at, pos = at + k, pos + c
        return out


class ExpertParallel(Strategy):
    name = "expert_parallel"

    def __init__(self, rt, settings, ep: int, capacity_factor: float | None):
        super().__init__(rt, settings)
        self.ep, self.dp, self.cf = ep, rt.world_size // ep, capacity_factor
        self.variant = f"ep{ep}-dp{self.dp}" + (f"-cf{capacity_factor:g}"
                                               if capacity_factor is not None else "")
        self.tokens: list = []   # per step: per layer, the tokens each expert received

    def build(self) -> None:
        w, r, ep = self.rt.world_size, self.rt.rank, self.ep
        timeout = datetime.timedelta(seconds=self.rt.timeout_s)
        # rank = d * EP + j: an EP group is EP consecutive ranks (one node), a DP group the
        # ranks holding the same experts; every rank creates every group in the same order
        ep_group = dp_group = None
        for d in range(self.dp):
            g = dist.new_group(list(range(d * ep, (d + 1) * ep)), timeout=timeout)
            ep_group = g if r // ep == d else ep_group
        for j in range(ep if self.dp > 1 else 0):
            g = dist.new_group(list(range(j, w, ep)), timeout=timeout)
            dp_group = g if r % ep == j else dp_group
        self.dp_group = dp_group
        self.model = ToyGPT(self.settings.model).to(self.rt.device)  # the baseline's init
        self.moes = [b.mlp for b in self.model.layers[1:-1]]
        self.shards = [ExpertShard(m, ep_group, self.comm, self.cf) for m in self.moes]
        for m in self.moes:
            m.reduce_counts = self.global_counts
        self.expert_params = [q for m in self.moes for q in m.experts.parameters()]
        ids = {id(q) for q in self.expert_params}
        self.shared_params = [q for q in self.model.parameters() if id(q) not in ids]
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.extra.update(ep=ep, dp=self.dp, experts=self.settings.model.moe_experts,
                          top_k=self.settings.model.moe_top_k, capacity_factor=self.cf)

    def global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Every rank's assignment counts summed: f_e of the whole global batch."""
        counts = counts.clone()
        self.comm.record("all_reduce", counts)
        dist.all_reduce(counts)
        return counts

    def forward_backward(self, x, y):
        loss = super().forward_backward(x, y)
        self.tokens.append([m.last_counts.tolist() for m in self.moes])
        return loss

    def after_backward(self) -> None:
        """The shared parameters saw this rank's rows: average over all ranks. An expert's
        gradient already sums its EP group's tokens: add the replicas' (DP), divide by all."""
        w = self.rt.world_size
        for q in self.expert_params:  # an expert no row reached here may have some elsewhere
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        for params, group, n in ((self.shared_params, None, w), (self.expert_params,
                                                                   self.dp_group, self.dp)):
            grads = [q.grad for q in params]
            flat = flatten(grads)
            if n > 1:
                self.comm.record("all_reduce", flat,
                                 sent_bytes=ring_sent_bytes("all_reduce", nbytes(flat), n))
                dist.all_reduce(flat, group=group)
            unflatten_into(flat.div_(w), grads)
        for m in self.moes:  # an expert no token of the global batch chose: no gradient at all,
            for e, expert in m.experts.items():  # as on one process (AdamW then skips it)
                if m.last_counts[int(e)] == 0:
                    for q in expert.parameters():
                        q.grad = None

    def param_layout(self) -> ParamLayout:
        """EP rank j holds its experts (and the shared part, equal everywhere) under the
        baseline's names: to the layout, as pipeline stage j holds its layers; the DP replicas
        of a shard are copies."""
        return ParamLayout(dict(self.model.named_parameters()), stages=self.ep,
                           stage=self.rt.rank % self.ep, replica=self.rt.rank // self.ep)

    def memory(self) -> dict:
        m = super().memory()
        m["dropped_assignments"] = sum(s.dropped for s in self.shards)
        m["rows_per_layer_step"] = [s.sent_rows for s in self.shards]  # [sent, received]
        return m

    def close(self) -> None:
        dropped = sum(self.gather_object(sum(s.dropped for s in self.shards)))
        if self.rt.is_main:
            self.extra.update(tokens_per_expert=self.tokens, dropped_assignments=dropped)
            if dropped:
                self.equivalent = False
                self.drift_reason = (f"capacity factor {self.cf:g} dropped {dropped} token "
                                     "assignments: not the one-process maths")
        super().close()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs.expert_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel ranks (default: every rank); the others are --dp")
    p.add_argument("--dp", type=int, default=None, help="replicas of the expert shards "
                   "(default: world / ep)")
    p.add_argument("--capacity-factor", type=finite, default=None,
                   help="cap each rank's rows per expert at ceil(C K n / E); drops the rest "
                        "(default: no cap)")
    return add_common_args(p)


def degrees(args, world: int) -> tuple[int, int]:
    ep = args.ep or (world // args.dp if args.dp else world)
    dp = args.dp or world // ep
    return ep, dp


def check_args(args, settings, world: int) -> None:
    cfg = settings.model
    if not cfg.moe_experts:
        raise UsageError("expert_parallel needs the mixture-of-experts model: give "
                         "--moe-experts E (and --moe-top-k K)")
    ep, dp = degrees(args, world)
    if ep < 1 or dp < 1 or ep * dp != world:
        raise UsageError(f"--ep {ep} x --dp {dp} must equal the {world} processes")
    if cfg.moe_experts % ep:
        raise UsageError(f"--moe-experts {cfg.moe_experts} must divide over the {ep} expert-"
                         f"parallel ranks; use a multiple of {ep}")
    if settings.batch_size % world:
        raise UsageError(f"--batch-size {settings.batch_size} must divide over the {world} "
                         "ranks (each takes its own rows)")
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        raise UsageError(f"--capacity-factor must be > 0, got {args.capacity_factor:g}")


def make_strategy(rt, settings, args) -> Strategy:
    return ExpertParallel(rt, settings, degrees(args, rt.world_size)[0], args.capacity_factor)


def main(argv=None) -> int:
    return run_lab(registry.get("expert_parallel"), make_parser(), make_strategy, argv,
                   check_args=check_args)


if __name__ == "__main__":
    sys.exit(main())
