"""Bytes of context parallelism's ring attention (labs/context_parallel.py), from the shapes
alone. Standard library only. tests/test_sequence.py holds it equal to what the lab counts; the
lab records it (``send_bytes_theory``) beside the counted bytes; docs/context-parallel.md."""
from __future__ import annotations


def ring_attention_bytes(cfg, rows: int, world: int, recompute_blocks: int = 0) -> dict:
    """Bytes one rank sends per step: every layer's forward passes K and V (W-1 times), its
    backward passes them again (W-1) plus their gradients (W times); a recomputed block repeats
    its forward. kv = 2 x rows x T/W x d_model x 4 bytes. ``cfg``: anything with ``seq_len``,
    ``d_model`` and ``n_layer`` (a ModelConfig)."""
    kv = 2 * rows * (cfg.seq_len // world) * cfg.d_model * 4
    L = cfg.n_layer
    return {"kv_block": kv,
            "send": (L + recompute_blocks) * (world - 1) * kv + L * (2 * world - 1) * kv}
