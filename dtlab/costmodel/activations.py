"""Bytes of activations autograd saves for ToyGPT, from the shapes alone (no torch needed: the
CLI's `dtlab memory` imports it before any lab). ``ActivationMeter`` in dtlab/measure/memory_meter.py
measures the same bytes in a real forward; the tests hold the two equal."""
from __future__ import annotations


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
