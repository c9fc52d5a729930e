"""Where a rank's parameters sit in the whole model, as one description every strategy gives
(``Strategy.param_layout``): the record's full parameters and a checkpoint's canonical state are
both put together from it, so no lab writes its own gather or cut.

A rank holds some tensors under the baseline's names: whole ones, and pieces of tensors cut
along one dimension over the tensor-parallel ranks (``split``). Ranks of different pipeline
stages hold different names; data-parallel (and context-parallel) copies hold the same, and only
copy 0 is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dtlab.costmodel.shapes import share


@dataclass
class ParamLayout:
    named: dict[str, torch.Tensor]                        # this rank's tensors, baseline names
    split: dict[str, int] = field(default_factory=dict)   # name -> dimension cut over TP ranks
    tp: int = 1
    tp_rank: int = 0
    stages: int = 1
    stage: int = 0
    replica: int = 0

    @property
    def whole(self) -> bool:
        """Every rank holds the whole model: nothing to gather."""
        return self.tp == 1 and self.stages == 1


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t``; a DTensor is gathered whole first (a collective)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def whole_params(layout: ParamLayout, gather, values: dict | None = None,
                 name_of=lambda key: key) -> dict[str, torch.Tensor]:
    """Whole tensors on every rank: ``values`` (default: the layout's tensors; keys that
    ``name_of`` maps to a parameter name, or to None for entries that are never cut), the TP
    pieces joined in TP-rank order, the stages put together. ``gather(obj)`` returns every rank's
    ``obj`` (a collective, unless the layout is whole)."""
    local = values if values is not None else {k: cpu_copy(v) for k, v in layout.named.items()}
    if layout.whole:
        return local
    mine = local if layout.replica == 0 else {}
    parts = [p for p in gather((layout.replica, layout.stage, layout.tp_rank, mine, layout.split))
             if p[0] == 0]
    out = {}
    for stage in range(layout.stages):
        pieces = sorted((t, held, split) for _, s, t, held, split in parts if s == stage)
        for key, value in pieces[0][1].items():
            dim = pieces[0][2].get(name_of(key))
            out[key] = value if dim is None else torch.cat([h[key] for _, h, _ in pieces], dim)
    return out


def take_part(layout: ParamLayout, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the whole tensor ``full`` named ``name`` (the inverse of the join)."""
    dim = layout.split.get(name)
    if dim is None:
        return full
    n = full.shape[dim]
    lo = sum(share(n, layout.tp, i) for i in range(layout.tp_rank))
    return full.narrow(dim, lo, share(n, layout.tp, layout.tp_rank))
