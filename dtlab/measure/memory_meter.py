"""Bytes per rank by category: parameters, gradients, optimizer state, activations, peak.

The first three are counted from the live tensors (each storage once, so views and tied weights
are not double counted). Activations are the tensors autograd saves for backward during a
forward pass, counted through ``saved_tensors_hooks`` (parameters excluded: they are counted as
parameters); all of them are alive at the end of the forward, so their sum is the step's peak.
With recomputation (dtlab/train/recompute.py) a checkpointed block saves only its input in the
forward and saves its whole set again while it is recomputed in the backward; the meter counts
that set too, beyond the input already kept, as ``recompute_peak`` (the largest one).
``peak`` is the process's peak resident memory on the CPU, or ``torch.cuda.max_memory_allocated``
when the run is on CUDA.
"""
from __future__ import annotations

import contextvars
import resource
import sys
from contextlib import contextmanager
from typing import Iterable

import torch

from dtlab.costmodel.activations import activation_formula, activation_formula_for  # noqa: F401


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's bytes are its local shard's (its own storage is not a real one)."""
    return getattr(t, "_local_tensor", t)


def _storage_key(t: torch.Tensor) -> tuple:
    t = _local(t)
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of distinct storages' sizes."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _local(t).untyped_storage().nbytes()
    return total


def param_bytes(params: Iterable[torch.Tensor]) -> int:
    return tensor_bytes(params)


def grad_bytes(params: Iterable[torch.Tensor]) -> int:
    return tensor_bytes(p.grad for p in params if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor))


# The meter of the forward being measured, if any: a recomputing block finds it here and later
# reports what its recomputation saved (a context variable: per thread, never shared).
CURRENT_METER: contextvars.ContextVar = contextvars.ContextVar("dtlab_meter", default=None)


@contextmanager
def _counting(params: list, into: list):
    """Add to ``into[0]`` the bytes of every distinct non-parameter storage autograd saves."""
    skip = {_storage_key(p) for p in params}
    seen: set = set()

    def pack(t: torch.Tensor):
        nonlocal skip
        key = _storage_key(t)
        if key not in skip:  # parameters may have moved (ZeRO-3 gathers them on demand)
            skip = {_storage_key(p) for p in params}
        if key not in skip and key not in seen:
            seen.add(key)
            into[0] += _local(t).untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class ActivationMeter:
    """Counts the bytes autograd saves for backward in each ``with meter.measure(params):``."""

    def __init__(self):
        self.peak = 0
        self.last = 0
        self.recompute_peak = 0
        self.params: list = []

    @contextmanager
    def measure(self, params: Iterable[torch.Tensor] = ()):
        self.params = list(params)
        total = [0]
        token = CURRENT_METER.set(self)
        try:
            with _counting(self.params, total):
                yield self
        finally:
            CURRENT_METER.reset(token)
        self.last = total[0]
        self.peak = max(self.peak, total[0])

    @contextmanager
    def measure_recompute(self, kept: torch.Tensor | None = None):
        """Count what one block saves while it is recomputed in the backward, beyond ``kept``
        (its input, saved since the forward and already counted there)."""
        total = [0]
        with _counting(self.params + ([kept] if kept is not None else []), total):
            yield
        self.recompute_peak = max(self.recompute_peak, total[0])


def process_peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def snapshot(params: list[torch.Tensor], optimizer, meter: ActivationMeter,
             device: torch.device) -> dict:
    return {
        "params": param_bytes(params),
        "grads": grad_bytes(params),
        "optimizer": optimizer_bytes(optimizer),
        "activations_peak": meter.peak,
        "recompute_peak": meter.recompute_peak,
        "peak": process_peak_bytes(device),
    }
