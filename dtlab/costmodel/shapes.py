"""What one rank of a layout holds, from the shapes alone: weights, gradients, AdamW state and
activations, for any cut of the model over data-parallel replicas, pipeline stages and
tensor-parallel shards.

Standard library only (the CLI builds without torch). The figures follow the labs exactly:
- ToyGPT's layers are [embedding, block x L, head] (dtlab/train/model.py); a pipeline stage owns
  the slice ``stage_bounds`` gives it (the embedding goes with stage 0, the head with the last);
- tensor parallelism (labs/tensor_parallel.py) cuts q, k, v and the MLP's first layer by output
  rows, the two projections by input columns (their biases stay whole), the head by vocabulary;
  the embedding and every LayerNorm stay whole; uneven cuts give the first ranks one more
  (``chunk_sizes``);
- AdamW keeps two fp32 moments a parameter and a 4-byte step counter a parameter tensor.
Activations per rank (:func:`activations`) build on
:func:`dtlab.costmodel.activations.activation_formula`, per pipeline stage and live micro-batch.
tests/test_costmodel.py, the 3D lab test (8 ranks, DP x PP x TP) and the DDP tests (2-4 ranks,
with micro-batches) hold both equal, to the byte, to what the runs count.
"""
from __future__ import annotations

from dataclasses import dataclass

from dtlab.costmodel.activations import activation_formula


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
    ``dtlab.train.model.stage_bounds``)."""
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



def live_microbatches(schedule: str, pp: int, stage: int, microbatches: int) -> int:
    """Most micro-batches whose activations a stage holds at once: all of them under GPipe,
    one per stage still ahead under 1F1B (the warm-up's forwards, plus one)."""
    return microbatches if schedule == "gpipe" else min(pp - stage, microbatches)


def activations(m: Shape, batch: int, dp: int = 1, tp: int = 1, t: int = 0, pp: int = 1,
                stage: int = 0, microbatches: int = 1, schedule: str = "1f1b",
                recompute: str = "none", every: int = 2, sp: bool = False, cp: int = 1) -> int:
    """Peak bytes autograd keeps on one rank when a global batch of ``batch`` sequences is cut
    over ``dp`` replicas, then into ``microbatches`` (pipelines): a pipeline stage counts its own
    blocks, the embedding or head when it holds them, times its live micro-batches. A rank's
    rows are views of the global batch, so the token indices the embedding saves (and the
    targets of a plain loss) keep the global batch's storage: what the meter counts with each
    micro-batch, and what a device holds as long as any of them lives."""
    b = batch // dp // microbatches
    full = activation_formula(m.n_layer, m.d_model, m.n_head, m.d_ff, m.vocab, b, m.seq,
                              recompute=recompute, every=every, tp=tp, sp=sp, cp=cp, tp_rank=t)
    whole = 8 * batch * m.seq - 8 * b * (m.seq // cp)  # the batch behind an index view
    lo, hi = stage_layers(m.n_layer, pp, stage)
    one = 0
    for i in range(max(lo, 1) - 1, min(hi, m.n_layer + 1) - 1):   # 0-based blocks
        kept = recompute == "full" or (recompute == "selective" and i % every == 0)
        one += full["kept_per_block"] if kept else full["per_block"]
    if lo == 0:
        one += full["embedding"] + whole
    if hi == m.n_layer + 2:
        one += full["head"] + (whole if tp == 1 else 0)
    return one * live_microbatches(schedule, pp, stage, microbatches)


def bubble(p: int, m: int, schedule: str = "1f1b", v: int = 1) -> float:
    """The idle fraction of the ideal schedule (equal stages, free messages, a backward twice a
    forward, B = W = F when the backward is split):
        GPipe, 1F1B   (P-1) / (M + P-1)
        interleaved   (P-1) / (V M + P-1)   the warm-up and cool-down ramps are V times shorter
        ZB-H1         (P-1) / (3M + P-1)    1F1B's bubble of P-1 slots of F+B+W becomes P-1 of
                                            F+B-W: a third (for M >= P)
    dtlab/report/pipeline_schedule.py's ``ideal`` replays any action lists (labs/pipeline.py's)
    and gives the same figures."""
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zbh1":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)


def zero_units(m: Shape, dp: int) -> list[tuple[int, int]]:
    """(elements, owned elements) of each ZeRO unit (one a layer, as labs/zero.py cuts them):
    a unit is padded to a multiple of dp and every rank owns an equal slice."""
    out = []
    for i in range(m.n_layer + 2):
        n = sum(layer_tensors(m, i))
        out.append((n, -(-n // dp)))
    return out


def zero_states(m: Shape, dp: int, stage: int, offload: str = "none") -> dict:
    """Device bytes of weights, gradients and AdamW state on one rank of labs/zero.py, padding
    included: from stage 1 the optimizer holds the owned slices (one step counter a unit), from
    stage 2 only the owned gradient slices stay, at stage 3 only the owned weight slices; with
    offload the optimizer side (and at stage 1 nothing else) leaves for the CPU."""
    units = zero_units(m, dp)
    n = sum(u[0] for u in units)
    owned = sum(u[1] for u in units)
    params = 4 * (owned if stage == 3 else n)
    if offload == "param":
        params = 0
    if offload != "none":
        grads = 4 * n if stage == 1 else 0
        optimizer = 0
    else:
        grads = 4 * owned + (4 * n if stage == 1 else 0)
        optimizer = 8 * owned + 4 * len(units)
    return {"params": params, "grads": grads, "optimizer": optimizer, "numel": owned,
            "tensors": len(units)}


def ring_factor(op: str, n: int) -> float:
    """Bytes a rank sends per byte of payload in a ring: 2(n-1)/n for all-reduce, (n-1)/n for
    all-gather and reduce-scatter."""
    return (2 if op == "all_reduce" else 1) * (n - 1) / n


def sent_bytes(m: Shape, batch: int, dp: int = 1, tp: int = 1, t: int = 0, pp: int = 1,
               stage: int = 0, zero: int = 0) -> dict:
    """Bytes one rank sends per step, by what they are for, with ring collectives:
    - ``dp``: the gradient average: 2(dp-1)/dp of the rank's gradient bytes (ZeRO 1 and 2 split
      it into a reduce-scatter and an all-gather of the same volume; ZeRO 3 gathers the weights
      once more in the backward: 3(dp-1)/dp);
    - ``tp``: per block two all-reduces forward and two backward of the activations A (rows x
      seq x d_model x 4 bytes), one more before the vocabulary-parallel head, and the loss's three
      fp32 numbers a token: (4 L + 1) A + 12 N, times 2(tp-1)/tp;
    - ``pp``: the activations to the next stage and their gradients back to the previous one,
      A for each neighbour.
    Labs pad ZeRO's flat partitions to a multiple of dp (a few elements): not counted here."""
    rows = batch // dp
    a = rows * m.seq * m.d_model * 4
    lo, hi = stage_layers(m.n_layer, pp, stage)
    blocks = min(hi, m.n_layer + 1) - max(lo, 1)
    head = hi == m.n_layer + 2
    grads = 4 * model_states(m, pp, stage, tp, t)["numel"]
    out = {"dp": (3 if zero == 3 else 2) * (dp - 1) / dp * grads if dp > 1 else 0.0,
           "tp": ring_factor("all_reduce", tp) * ((4 * blocks + head) * a +
                                                  (12 * rows * m.seq if head else 0))
           if tp > 1 else 0.0,
           "pp": a * ((stage > 0) + (stage < pp - 1))}
    out["total"] = sum(out.values())
    return out
