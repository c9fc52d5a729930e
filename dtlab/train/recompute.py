"""Activation recomputation (checkpointing): keep a block's input, not its activations, and run
its forward a second time in the backward.

A block's backward needs the tensors its forward produced (LayerNorm inputs, q, k, v, the MLP's
hidden layer, ...). ``recompute(fn, x)`` runs ``fn(x)`` without recording a graph, so none of those
are kept, and saves only ``x``. When the backward reaches the block it runs ``fn(x)`` again, this
time recording, and back-propagates the incoming gradient through that fresh graph: the
parameters' gradients accumulate as usual and the gradient of ``x`` is passed on. The cost is one
more forward of the block per step; the result is bit-for-bit the same, because the same
operations run on the same values (the model has no dropout, so no random state to replay).

The recomputation must repeat the forward exactly: under autocast (mixed precision) the
backward runs outside the autocast region, so the forward's autocast state is recorded and
entered again around the recomputation.

This is the reentrant form (torch.utils.checkpoint with ``use_reentrant=True`` works the same
way), written out so the memory meter sees what is kept: the saved input in the forward, and
what the block saves beyond it while it is recomputed (``ActivationMeter.recompute_peak``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from dtlab.measure.memory_meter import CURRENT_METER


def _autocast_state(device_type: str) -> dict | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return {"device_type": device_type, "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, meter, x: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.meter = fn, meter
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)          # the only activation the block keeps
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            if ctx.autocast is not None:   # the forward ran under autocast: so must this
                stack.enter_context(torch.autocast(**ctx.autocast))
            if ctx.meter is not None:      # what the block saves beyond its kept input
                stack.enter_context(ctx.meter.measure_recompute(kept=x))
            out = ctx.fn(x)
        torch.autograd.backward(out, grad)  # parameters' gradients accumulate here
        return None, None, x.grad


def recompute(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, keeping only ``x`` for the backward and recomputing ``fn`` there. An input that
    needs no gradient would leave the output without a graph (and the block's parameters
    without gradients), so such a call simply runs ``fn(x)``."""
    if not x.requires_grad or x.device.type == "meta":  # meta: shapes only (FLOP counting)
        return fn(x)
    return _Recompute.apply(fn, CURRENT_METER.get(), x)
