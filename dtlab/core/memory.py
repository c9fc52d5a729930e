"""Bytes per rank by category: parameters, gradients, optimizer state, activations, peak.

The first three are counted from the live tensors (each storage once, so views and tied weights
are not double counted). Activations are the tensors autograd saves for backward during a
forward pass, counted through ``saved_tensors_hooks`` (parameters excluded: they are counted as
parameters); all of them are alive at the end of the forward, so their sum is the step's peak.
``peak`` is the process's peak resident memory on the CPU, or ``torch.cuda.max_memory_allocated``
when the run is on CUDA.
"""
from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from typing import Iterable

import torch


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


class ActivationMeter:
    """Counts the bytes autograd saves for backward in each ``with meter.measure(params):``."""

    def __init__(self):
        self.peak = 0
        self.last = 0

    @contextmanager
    def measure(self, params: Iterable[torch.Tensor] = ()):
        params = list(params)
        skip = {_storage_key(p) for p in params}
        seen: set = set()
        total = 0

        def pack(t: torch.Tensor):
            nonlocal total, skip
            key = _storage_key(t)
            if key not in skip:  # parameters may have moved (ZeRO-3 gathers them on demand)
                skip = {_storage_key(p) for p in params}
            if key not in skip and key not in seen:
                seen.add(key)
                total += _local(t).untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self
        self.last = total
        self.peak = max(self.peak, total)


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
        "peak": process_peak_bytes(device),
    }

