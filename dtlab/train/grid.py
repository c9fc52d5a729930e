"""The grid of ranks: data x pipeline x context x tensor parallel degrees, validated once, passed
as a value.

The W = dp x pp x cp x tp ranks are laid out as ``arange(W).view(dp, pp, cp, tp)``, TP fastest:

    rank = ((d * pp + p) * cp + c) * tp + t

(with cp = 1, the 3D grid: rank = (d * pp + p) * tp + t), so consecutive ranks form a TP
group (on a real cluster: the GPUs of one node, joined by NVLink), a pipeline runs across the TP
groups of one replica, and the DP replicas are outermost. Context parallelism sits next to TP:
its ring passes K and V every layer, the second chattiest traffic after TP's.
``order="pp-inner"`` swaps TP and PP (rank = (d * tp + t) * pp + p): consecutive ranks then hold
consecutive pipeline stages, and a TP group spans nodes, the layout to measure against (3D only:
with cp > 1 the order is tp-inner).
Megatron-LM orders the same grid with PP outermost and DeepSpeed's topology is (pipe, data,
model); what matters on a cluster is that TP, the chattiest, stays inside a node
(docs/3d-parallel.md).

A ``Grid`` knows a rank's coordinates, its pipeline neighbours and the ranks of its TP and DP
groups, and with cp > 1 its CP group (the ring) and the DP x CP group that averages gradients
(every rank holding the same shard); ``with_groups()`` creates the process groups (a
collective: every rank calls it). Labs take the grid as an argument; nothing about it is kept in
module state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from dtlab.errors import UsageError


@dataclass(frozen=True)
class Grid:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    rank: int = 0
    order: str = "tp-inner"  # consecutive ranks share a TP group; "pp-inner": a pipeline
    cp: int = 1
    tp_group: object = field(default=None, compare=False, repr=False)
    dp_group: object = field(default=None, compare=False, repr=False)
    cp_group: object = field(default=None, compare=False, repr=False)
    dp_cp_group: object = field(default=None, compare=False, repr=False)

    # ---- checks, before any process group exists
    @property
    def world(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    def validate(self, world: int, model, batch_size: int, microbatches: int = 1,
                 preset: str = "") -> None:
        """Every way this grid can fail to fit the run, as one UsageError naming the fix."""
        what = f" of preset {preset!r}" if preset else ""
        if self.order not in ("tp-inner", "pp-inner"):
            raise UsageError(f"--order must be tp-inner or pp-inner, got {self.order!r}")
        if min(self.dp, self.pp, self.tp, self.cp) < 1:
            raise UsageError(f"--dp, --pp, --tp and --cp must be >= 1, got {self.dp}, {self.pp}, "
                             f"{self.tp}, {self.cp}")
        if self.world != world:
            names, values = ("dp x pp x tp", f"{self.dp} x {self.pp} x {self.tp}")
            if self.cp > 1:
                names = "dp x pp x cp x tp"
                values = f"{self.dp} x {self.pp} x {self.cp} x {self.tp}"
            raise UsageError(f"world size {world} != {names} = {values} = {self.world}; make "
                             "--nproc equal their product")
        if self.cp > 1 and self.order != "tp-inner":
            raise UsageError("--cp > 1 lays ranks out tp-inner only; drop --order pp-inner")
        if self.cp > 1 and model.seq_len % (2 * self.cp):
            raise UsageError(f"context parallel size {self.cp} must split seq_len="
                             f"{model.seq_len}{what} into {2 * self.cp} equal zig-zag chunks; "
                             f"give --seq-len a multiple of {2 * self.cp} or a smaller --cp")
        if self.tp > 1:
            for name in ("n_head", "d_model", "d_ff"):
                if getattr(model, name) % self.tp:
                    raise UsageError(
                        f"tensor parallel size {self.tp} must divide {name}="
                        f"{getattr(model, name)}{what}; pick a TP size that divides "
                        f"n_head={model.n_head}, d_model={model.d_model} and d_ff={model.d_ff}, "
                        "or a preset with more heads (small has 4)")
        if self.pp > model.n_layer:
            owner = f"preset {preset!r}" if preset else "the model"
            raise UsageError(f"{self.pp} pipeline stages but {owner} has {model.n_layer} blocks; "
                             f"use at most {model.n_layer} stages or a preset with more layers")
        if batch_size % self.dp:
            lo = batch_size - batch_size % self.dp
            raise UsageError(f"--batch-size {batch_size} is not divisible by the {self.dp} "
                             f"data-parallel replicas; use a multiple of {self.dp} (e.g. "
                             f"{lo or self.dp} or {lo + self.dp})")
        rows = batch_size // self.dp
        if microbatches < 1 or rows % microbatches:
            raise UsageError(f"--microbatches {microbatches} must be >= 1 and divide the {rows} "
                             "rows each data-parallel replica gets")

    # ---- where a rank sits
    def at(self, rank: int) -> Grid:
        return replace(self, rank=rank)

    @property
    def coords(self) -> tuple[int, int, int]:
        """(d, p, t) of this rank (its context-parallel index is ``c``)."""
        r = self.rank
        if self.order == "pp-inner":
            return r // (self.pp * self.tp), r % self.pp, (r // self.pp) % self.tp
        per_d = self.pp * self.cp * self.tp
        return r // per_d, (r % per_d) // (self.cp * self.tp), r % self.tp

    @property
    def c(self) -> int:
        return 0 if self.order == "pp-inner" else (self.rank // self.tp) % self.cp

    @property
    def d(self) -> int:
        return self.coords[0]

    @property
    def p(self) -> int:
        return self.coords[1]

    @property
    def t(self) -> int:
        return self.coords[2]

    def rank_of(self, d: int, p: int, t: int, c: int = 0) -> int:
        if self.order == "pp-inner":
            return (d * self.tp + t) * self.pp + p
        return ((d * self.pp + p) * self.cp + c) * self.tp + t

    @property
    def prev_rank(self) -> int | None:
        """The rank holding the previous pipeline stage at the same (d, c, t), if any."""
        d, p, t = self.coords
        return self.rank_of(d, p - 1, t, self.c) if p > 0 else None

    @property
    def next_rank(self) -> int | None:
        d, p, t = self.coords
        return self.rank_of(d, p + 1, t, self.c) if p < self.pp - 1 else None

    def stage_rank(self, p: int) -> int:
        """The rank holding pipeline stage ``p`` (modulo pp: an interleaved schedule's chunk
        after the last stage is on stage 0 again) at this rank's (d, c, t)."""
        d, _, t = self.coords
        return self.rank_of(d, p % self.pp, t, self.c)

    def tp_ranks(self, d: int, p: int, c: int = 0) -> list[int]:
        return [self.rank_of(d, p, t, c) for t in range(self.tp)]

    def dp_ranks(self, p: int, t: int, c: int = 0) -> list[int]:
        return [self.rank_of(d, p, t, c) for d in range(self.dp)]

    def cp_ranks(self, d: int, p: int, t: int) -> list[int]:
        return [self.rank_of(d, p, t, c) for c in range(self.cp)]

    def dp_cp_ranks(self, p: int, t: int) -> list[int]:
        """Every rank holding the same shard (p, t): the gradient-averaging group."""
        return sorted(self.rank_of(d, p, t, c) for d in range(self.dp) for c in range(self.cp))

    # ---- process groups
    def with_groups(self, timeout_s: float | None = None) -> Grid:
        """This grid with its TP and DP process groups, each with the run's timeout (a new group
        does not inherit it: without one, a rank that stops would be waited for 30 minutes).
        A collective: every rank of the default group calls it, and every rank creates every
        group in the same order (torch requires it), keeping the ones it belongs to."""
        import datetime

        import torch.distributed as dist
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        if not (dist.is_available() and dist.is_initialized()) or self.world == 1:
            return self
        tp_group, dp_group, cp_group = (self._new_groups(a, timeout) for a in "tdc")
        dp_cp_group = self._new_groups("dc", timeout) if self.dp > 1 and self.cp > 1 else \
            (dp_group if dp_group is not None else cp_group)
        return replace(self, tp_group=tp_group, dp_group=dp_group, cp_group=cp_group,
                       dp_cp_group=dp_cp_group)

    def _new_groups(self, vary: str, timeout):
        """Every group of the ranks whose coordinates differ only in ``vary`` (letters of
        "dpct"), created in one order on every rank; the group holding this rank. None where
        such groups would hold one rank (they are never used)."""
        import torch.distributed as dist
        sizes = {"d": self.dp, "p": self.pp, "c": self.cp, "t": self.tp}
        if all(sizes[a] == 1 for a in vary):
            return None
        members: dict[tuple, list[int]] = {}
        for r in range(self.world):
            g = self.at(r)
            where = dict(zip("dpt", g.coords), c=g.c)
            members.setdefault(tuple(where[a] for a in "dpct" if a not in vary), []).append(r)
        mine = None
        for key in sorted(members):
            group = dist.new_group(members[key], timeout=timeout)
            if self.rank in members[key]:
                mine = group
        return mine

    def describe(self) -> dict:
        return {"dp": self.dp, "pp": self.pp, "tp": self.tp, "cp": self.cp, "order": self.order}
