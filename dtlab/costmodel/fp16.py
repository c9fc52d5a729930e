"""The fp16 format, in the standard library (``struct``'s half-precision ``"e"`` rounds as the
hardware does, to nearest even): its range and spacing, and why mixed precision keeps fp32
master weights (docs/amp.md)."""
from __future__ import annotations

import struct

SMALLEST_NORMAL = 2.0**-14      # 6.1e-5: below it, subnormals keep ever fewer significant bits
SMALLEST_SUBNORMAL = 2.0**-24   # 6.0e-8: below half of it a value rounds to zero
EPS = 2.0**-10                  # the spacing of fp16 numbers from 1.0 to 2


def to_fp16(x: float) -> float:
    return struct.unpack("e", struct.pack("e", x))[0]


def to_fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def master_weights_demo(weight: float = 1.0, update: float = 1e-4, steps: int = 100) -> dict:
    """Add a small update to a weight many times, in fp16 and through an fp32 copy: an update
    below half the fp16 spacing at the weight rounds away every time."""
    w16, w32 = to_fp16(weight), to_fp32(weight)
    for _ in range(steps):
        w16 = to_fp16(w16 + to_fp16(update))  # the sum of two fp16 numbers, rounded to fp16
        w32 = to_fp32(w32 + to_fp32(update))
    return {"weight": weight, "update": update, "steps": steps, "fp16_ulp_at_weight": EPS * weight,
            "fp16_result": w16, "fp32_master_result": w32, "expected": weight + update * steps}
