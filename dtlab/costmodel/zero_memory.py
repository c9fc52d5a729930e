"""ZeRO's formula: bytes of model states per rank by category, for every stage, offload choice
and precision. Standard library only, so ``dtlab memory`` (and ``dtlab list``, which builds the
same parser) start without importing torch."""
from __future__ import annotations

# Bytes per parameter of each model state. fp32: weights, gradients, Adam's two moments.
# mixed (fp16/bf16 with fp32 master weights, DeepSpeed's layout): 16-bit weights and gradients,
# and an optimizer side of fp32 gradient partition, fp32 master weights and the moments.
BYTES_PER_PARAM = {"fp32": {"params": 4, "grads": 4, "optimizer": 8},
                   "mixed": {"params": 2, "grads": 2, "optimizer": 4 + 4 + 8}}


def zero_state_bytes(params: int, world: int, stage: int, offload: str = "none",
                     precision: str = "fp32") -> dict:
    """Bytes of model states per rank, by category, on the device and (with offload) on the
    CPU, for ZeRO ``stage`` over ``world`` data-parallel ranks. The lab (labs/zero.py) measures
    these exactly; ``dtlab memory`` builds on them.

    Partitioned from stage 1: the optimizer side; from stage 2: the gradients; from stage 3: the
    weights. Offload (``optimizer``, or ``param`` at stage 3) moves the optimizer side to the CPU
    (in fp32 the step also needs the owned weight slice and its gradient there), and at stages 2
    and 3 each reduced gradient partition leaves for the CPU at once; ``param`` moves the weight
    partition too. In mixed precision at stage 3 the reduced gradients go straight into the fp32
    partition, so no 16-bit gradient partition stays."""
    c, P, W = BYTES_PER_PARAM[precision], params, world
    part = lambda from_stage: W if stage >= from_stage else 1  # noqa: E731  partitioned or not
    dev = {"params": c["params"] * P / part(3), "grads": c["grads"] * P / part(2),
           "optimizer": c["optimizer"] * P / part(1)}
    cpu = {"params": 0.0, "grads": 0.0, "optimizer": 0.0}
    if precision == "mixed" and stage == 3:
        dev["grads"] = 0.0
    if offload in ("optimizer", "param"):
        cpu["optimizer"], dev["optimizer"] = dev["optimizer"], 0.0
        if precision == "fp32":
            cpu["params"] = cpu["grads"] = 4 * P / W
        if stage >= 2:
            dev["grads"] = 0.0
    if offload == "param":
        if precision == "mixed":  # fp32 runs step the one fp32 slice already counted on the CPU
            cpu["params"] += dev["params"]
        dev["params"] = 0.0
    dev["total"] = sum(dev.values())
    cpu["total"] = sum(cpu.values())
    return {"device": dev, "cpu": cpu}


def beside_formula(measured: dict, formula: dict, buffers: dict) -> dict:
    """Measured bytes by category (``measured``, its CPU side under ``"offload"``) beside the
    formula of :func:`zero_state_bytes` plus ``buffers``: the bytes it leaves out, keyed
    ``"device.grads"`` and the like. One row a place and category, with measured/expected."""
    rows = {}
    for where, got in (("device", measured), ("cpu", measured.get("offload", {}))):
        for cat in ("params", "grads", "optimizer"):
            key, extra = f"{where}.{cat}", buffers.get(f"{where}.{cat}", 0)
            expect = formula[where][cat] + extra
            rows[key] = {"measured": got.get(cat, 0), "formula": formula[where][cat],
                         "buffers": extra, "ratio": got.get(cat, 0) / expect if expect else None}
    return rows
