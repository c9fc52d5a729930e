"""Bytes of expert parallelism's all-to-alls (labs/expert_parallel.py), from the routing alone.
Standard library only; tests/test_experts.py holds it equal to what the lab counts, over the rows
the routing really sent (docs/expert-parallel.md)."""
from __future__ import annotations


def all_to_all_bytes(sent: int, received: int, d_model: int, ep: int, per: int) -> float:
    """Bytes one rank sends in one MoE layer's step: the counts (int64, ``per`` experts a rank, to
    the other EP - 1 ranks); its ``sent`` rows to other ranks' experts, then the outputs of the
    ``received`` rows back, in the forward; in the backward the gradients of both the other way:
    2 (sent + received) rows of d_model fp32."""
    return (ep - 1) * per * 8 + 2 * (sent + received) * d_model * 4
