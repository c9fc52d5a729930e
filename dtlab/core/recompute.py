"""Activation recomputation (checkpointing): keep a block's input, not its activations, and run
its forward a second time in the backward.

A block's backward needs the tensors its forward produced (LayerNorm inputs, q, k, v, the MLP's
hidden layer, ...). ``recompute(fn, x)`` runs ``fn(x)`` without recording a graph, so none of those
are kept, and saves only ``x``. When the backward reaches the block it runs ``fn(x)`` again, this
time recording, and back-propagates the incoming gradient through that fresh graph: the
parameters' gradients accumulate as usual and the gradient of ``x`` is passed on. The cost is one
more forward of the block per step; the result is bit-for-bit the same, because the same
operations run on the same values (the model has no dropout, so no random state to replay).

This is the reentrant form (torch.utils.checkpoint with ``use_reentrant=True`` works the same
way), written out so the memory meter sees what is kept: the saved input in the forward, and the
block's whole set while it is recomputed (``ActivationMeter.recompute_peak``).
"""
from __future__ import annotations

from typing import Callable

import torch

from dtlab.core.memory import CURRENT_METER


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, meter, x: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.meter = fn, meter
        ctx.save_for_backward(x)          # the only activation the block keeps
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            if ctx.meter is not None:
                with ctx.meter.measure_recompute():
                    out = ctx.fn(x)
            else:
                out = ctx.fn(x)
        torch.autograd.backward(out, grad)  # parameters' gradients accumulate here
        return None, None, x.grad


def recompute(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, keeping only ``x`` for the backward and recomputing ``fn`` there."""
    return _Recompute.apply(fn, CURRENT_METER.get(), x)
