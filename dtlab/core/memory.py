"""Bytes per rank by category: parameters, gradients, optimizer state, activations, peak.

The first three are counted from the live tensors (each storage once, so views and tied weights
are not double counted). Activations are the tensors autograd saves for backward during a
forward pass, counted through ``saved_tensors_hooks`` (parameters excluded: they are counted as
parameters); all of them are alive at the end of the forward, so their sum is the step's peak.
With recomputation (dtlab/core/recompute.py) a checkpointed block saves only its input in the
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


def activation_formula(n_layer: int, d_model: int, n_head: int, d_ff: int, vocab: int,
                       rows: int, seq: int, act_bytes: int = 4, recompute: str = "none",
                       every: int = 2, tp: int = 1, sp: bool = False, cp: int = 1,
                       tp_rank: int = 0) -> dict:
    """Bytes autograd saves in one forward of ToyGPT on one rank, from the shapes alone: what
    :class:`ActivationMeter` measures, term by term (docs/activation-recomputation.md).

    ``rows`` sequences of ``seq`` tokens reach the rank; context parallelism leaves it seq/cp of
    them, tensor parallelism cuts heads and the MLP's width by tp, sequence parallelism also cuts
    the LayerNorm inputs and statistics (the residual stream) by tp. A recomputed block keeps
    only its input; ``recompute_peak`` is what one block saves beyond that input while it is
    recomputed (forward + recompute_peak is the peak). ``tp_rank`` picks the rank's share of the
    vocabulary (the first V mod tp ranks hold one id more). LayerNorm statistics and the
    attention log-sum-exp are fp32 (4 bytes), token and position indices int64; the rest
    ``act_bytes``."""
    s, b, h, f, a, V = seq // cp, rows, d_model, d_ff, n_head, vocab
    sb = s * b
    ln_in = sb * h // (tp if sp else 1)                # LayerNorm input, per LayerNorm
    ln_stats = 2 * sb // (tp if sp else 1) * 4         # mean and rstd, per LayerNorm
    block = {
        "layernorm_inputs": 2 * ln_in * act_bytes + 2 * ln_stats,
        "layernorm_outputs": 2 * sb * h * act_bytes,  # read by q/k/v and fc (gathered under SP)
        "attention": (4 * sb * h // tp) * act_bytes + (a // tp) * sb * 4,  # q, k, v, out; lse
        "mlp": (2 * sb * f // tp) * act_bytes,        # fc output (GELU's input), GELU output
    }
    per_block = sum(block.values())
    kept = ln_in * act_bytes                           # a recomputed block keeps its input
    n_re = sum(1 for i in range(n_layer) if recompute == "full" or
               (recompute == "selective" and i % every == 0))
    embedding = 8 * sb + 8 * s                         # token and position indices
    if tp == 1:   # final LayerNorm, its output (the head's input), log-softmax, targets
        head = 2 * sb * h * act_bytes + 2 * sb * 4 + V * sb * 4 + 8 * sb + 4
    else:         # vocabulary-parallel: this rank's softmax slice, a mask and local targets
        v_local = V // tp + (1 if tp_rank < V % tp else 0)
        head = (ln_in + sb * h) * act_bytes + ln_stats + v_local * sb * 4 + sb + 8 * sb
    forward = embedding + (n_layer - n_re) * per_block + n_re * kept + head
    return {"forward": forward, "per_block": per_block, "block": block, "kept_per_block": kept,
            "recomputed_blocks": n_re, "embedding": embedding, "head": head,
            "recompute_peak": per_block - kept if n_re else 0}


def activation_formula_for(cfg, rows: int, tp: int = 1, sp: bool = False, cp: int = 1,
                           act_bytes: int = 4, tp_rank: int = 0) -> dict:
    """:func:`activation_formula` for a ``ModelConfig`` (its recompute setting included)."""
    return activation_formula(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.vocab_size,
                              rows, cfg.seq_len, act_bytes, cfg.recompute, cfg.recompute_every,
                              tp, sp, cp, tp_rank)
