"""Counting communication: calls and bytes per operation, per rank.

Two numbers are kept for every operation:
- ``bytes``: the payload handed to the operation (for all_gather the gathered output, for
  reduce_scatter the full input, for send the message);
- ``sent_bytes``: what this rank puts on the wire. For point-to-point messages that we issue
  ourselves it is counted exactly. For a library collective it is the payload times the factor of
  the ring algorithm, the same model nccl-tests uses to turn algorithm bandwidth into bus
  bandwidth: all_reduce 2(W-1)/W, all_gather and reduce_scatter (W-1)/W, broadcast (W-1)/W (the
  average over ranks of a pipelined ring broadcast, in which every rank but the last forwards
  the message once).

``comm.bytes_per_step`` in a run record is ``sent_bytes`` per rank per training step.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

RING_FACTORS = {
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "broadcast": lambda w: (w - 1) / w,
    "reduce": lambda w: (w - 1) / w,
}


def ring_sent_bytes(op: str, payload_bytes: int, world: int) -> float:
    """Bytes one rank sends for a library collective on ``payload_bytes`` (ring model)."""
    if op not in RING_FACTORS:
        raise KeyError(f"no ring model for {op!r}; count point-to-point traffic with "
                       "CommCounter.record(op, payload, sent_bytes=...)")
    return RING_FACTORS[op](world) * payload_bytes


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    """Per-rank tally. ``record`` on every communication; ``end_step`` at every step's end."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.by_op: dict[str, dict[str, float]] = defaultdict(
            lambda: {"calls": 0, "bytes": 0, "sent_bytes": 0.0})
        self.step_sent: list[float] = []
        self.step_calls: list[int] = []
        self._mark = (0.0, 0)

    def record(self, op: str, payload: torch.Tensor | int, sent_bytes: float | None = None) -> None:
        size = payload if isinstance(payload, int) else nbytes(payload)
        if sent_bytes is None:
            sent_bytes = ring_sent_bytes(op, size, self.world_size)
        row = self.by_op[op]
        row["calls"] += 1
        row["bytes"] += size
        row["sent_bytes"] += sent_bytes

    def totals(self) -> tuple[float, int]:
        return (sum(r["sent_bytes"] for r in self.by_op.values()),
                sum(r["calls"] for r in self.by_op.values()))

    def end_step(self) -> None:
        sent, calls = self.totals()
        self.step_sent.append(sent - self._mark[0])
        self.step_calls.append(calls - self._mark[1])
        self._mark = (sent, calls)

    def summary(self) -> dict:
        steps = max(1, len(self.step_sent))
        sent, calls = self.totals()
        return {
            "bytes_per_step": sent / steps,
            "calls_per_step": calls / steps,
            "by_op": {op: {k: (int(v) if k == "calls" else v) for k, v in row.items()}
                      for op, row in sorted(self.by_op.items())},
        }


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous 1-D copy of several tensors: one message instead of many."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` back into ``tensors`` (the inverse of flatten)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def counting_allreduce_hook(counter: CommCounter):
    """A DDP communication hook that does what DDP's default does (divide the bucket by the
    world size, all-reduce it asynchronously) and counts each bucket it sends."""

    # No annotations on purpose: DDP checks them, and this module's string annotations
    # (from __future__) would not compare equal to dist.GradBucket.
    def hook(state, bucket):
        buf = bucket.buffer()
        counter.record("all_reduce", buf)
        buf.div_(dist.get_world_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    return hook


# c10d operator -> (our op name, which argument holds the payload). The payload is what the
# operation hands over: the gathered output of an all-gather, the full input of a reduce-scatter.
_C10D_OPS = {
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0), "reduce_": ("reduce", 0),
    "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_base_": ("all_to_all", 0), "send": ("send", 0), "recv_": ("recv", 0),
}


_FUNCTIONAL_OPS = {"all_reduce": "all_reduce", "all_reduce_": "all_reduce",
                   "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor":
                   "reduce_scatter", "broadcast": "broadcast", "broadcast_": "broadcast",
                   "all_to_all_single": "all_to_all"}


def _payload_bytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return nbytes(arg)
    return sum(_payload_bytes(a) for a in arg) if isinstance(arg, (list, tuple)) else 0


def library_collectives(counter: CommCounter):
    """A context in which every torch.distributed operation issued from this thread by library
    code (FSDP, FairScale, DeepSpeed) is counted into ``counter``: it watches the c10d operators
    at the dispatcher, where every collective passes whatever Python API called it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if func.namespace == "_c10d_functional" and name in _FUNCTIONAL_OPS:
                op = _FUNCTIONAL_OPS[name]  # DTensor's collectives (out-of-place, functional)
                size = _payload_bytes(args[0])
                if op == "all_gather":
                    size *= args[1]  # the gathered tensor: the shard times the group size
                counter.record(op, size, None)
            elif func.namespace == "c10d" and name in _C10D_OPS:
                op, i = _C10D_OPS[name]
                size = _payload_bytes(args[i])
                sent = {"send": size, "recv": 0,
                        "all_to_all": size * (counter.world_size - 1) / counter.world_size}
                counter.record(op, size, sent.get(op))
            return func(*args, **(kwargs or {}))

    return _Counting()
