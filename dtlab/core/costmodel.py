"""What one rank of a layout holds, from the shapes alone: weights, gradients and AdamW state
for any cut of the model into pipeline stages and tensor-parallel shards.

Standard library only (the CLI builds without torch). The figures follow the labs exactly:
- ToyGPT's layers are [embedding, block x L, head] (dtlab/core/model.py); a pipeline stage owns
  the slice ``stage_bounds`` gives it (the embedding goes with stage 0, the head with the last);
- tensor parallelism (labs/tensor_parallel.py) cuts q, k, v and the MLP's first layer by output
  rows, the two projections by input columns (their biases stay whole), the head by vocabulary;
  the embedding and every LayerNorm stay whole; uneven cuts give the first ranks one more
  (``chunk_sizes``);
- AdamW keeps two fp32 moments a parameter and a 4-byte step counter a parameter tensor.
tests/test_costmodel.py and the 3D lab test hold these equal to what the runs count. Activations
are :func:`dtlab.core.activations.activation_formula`'s.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab: int
    seq: int


def share(n: int, parts: int, index: int) -> int:
    """Elements of part ``index`` when n is cut in ``parts`` (the first n % parts get one more)."""
    base, extra = divmod(n, parts)
    return base + (1 if index < extra else 0)


def stage_layers(n_layer: int, stages: int, stage: int) -> tuple[int, int]:
    """[lo, hi) into [embedding, blocks..., head] for pipeline stage ``stage`` (as
    ``dtlab.core.model.stage_bounds``)."""
    base, extra = divmod(n_layer, stages)
    start = 1 + stage * base + min(stage, extra)
    end = start + base + (1 if stage < extra else 0)
    return (0 if stage == 0 else start), end + (1 if stage == stages - 1 else 0)


def layer_tensors(m: Shape, index: int, tp: int = 1, t: int = 0) -> list[int]:
    """Element counts of the parameter tensors of layer ``index`` of [embedding, blocks, head]
    on TP rank ``t`` of ``tp``."""
    h, f = m.d_model, m.d_ff
    if index == 0:
        return [m.vocab * h, m.seq * h]
    if index == m.n_layer + 1:
        return [h, h, share(m.vocab, tp, t) * h]                     # ln_f, head
    hs, fs = share(h, tp, t), share(f, tp, t)
    return [h, h,                                                    # ln1
            hs * h, hs * h, hs * h,                                  # q, k, v
            h * hs, h,                                               # attn.proj, its bias
            h, h,                                                    # ln2
            fs * h, fs,                                              # mlp.fc
            h * fs, h]                                               # mlp.proj, its bias


def rank_tensors(m: Shape, pp: int = 1, stage: int = 0, tp: int = 1, t: int = 0) -> list[int]:
    lo, hi = stage_layers(m.n_layer, pp, stage)
    return [n for i in range(lo, hi) for n in layer_tensors(m, i, tp, t)]


def model_states(m: Shape, pp: int = 1, stage: int = 0, tp: int = 1, t: int = 0) -> dict:
    """Bytes of fp32 weights, gradients and AdamW state on one rank (no ZeRO)."""
    tensors = rank_tensors(m, pp, stage, tp, t)
    n = sum(tensors)
    return {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * len(tensors),
            "numel": n}


def total_params(m: Shape) -> int:
    return sum(rank_tensors(m))

