"""Memory for long sequences: activation recomputation, sequence parallelism and context
parallelism (ring attention), each equal to the baseline, with measured activation bytes equal
to the formula (dtlab/costmodel/activations.py: activation_formula) and counted bytes equal to theirs.

Each lab run is made once per session and shared between the assertions that read it."""
from dataclasses import replace
from functools import lru_cache

import pytest

from conftest import run_lab
from dtlab.costmodel.ring_attention import ring_attention_bytes
from dtlab.measure.memory_meter import activation_formula_for
from dtlab.train.model import config_from_preset
from labs.context_parallel import block_pairs, layout_chunks

VOCAB = 13          # the synthetic task's vocabulary
STEPS = 3


def cfg(preset="tiny", **kw):
    return replace(config_from_preset(preset, VOCAB), **kw)


@lru_cache(maxsize=None)
def lab(name, nproc, *args):
    import tempfile
    out = tempfile.mkdtemp(prefix=f"dtlab-seq-{name}-")
    p, s = run_lab(name, nproc, out, "--steps", STEPS, *args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    b = s["baseline"]
    assert b["ok"] is True and b["max_rel_loss_diff"] <= 1e-5 and b["max_abs_param_diff"] <= 1e-4
    return s


def acts(s, rank=0):
    return s["memory"]["per_rank"][rank]


# --------------------------------------------------------------------------- recomputation

def test_recompute_keeps_every_bit_and_the_memory_formula():
    """Full recomputation with TP + SP: the same losses and parameters, bit for bit, as the run
    without it; the forward keeps only block inputs (sharded by SP), one block's set is saved
    again while recomputed; the recomputed forward repeats its collectives."""
    tp, L = 2, cfg().n_layer
    plain = lab("tensor_parallel", tp, "--sp")
    re = lab("tensor_parallel", tp, "--sp", "--recompute", "full")
    assert re["losses"] == plain["losses"] and re["params_sha256"] == plain["params_sha256"]
    for r in range(tp):
        f = activation_formula_for(cfg(recompute="full"), 16, tp=tp, sp=True, tp_rank=r)
        assert acts(re, r)["activations_peak"] == f["forward"]
        # beyond the kept input, the rest of the block's set while it is recomputed
        assert acts(re, r)["recompute_peak"] == f["recompute_peak"] == \
            f["per_block"] - f["kept_per_block"]
    assert f["forward"] < activation_formula_for(cfg(), 16, tp=tp, sp=True)["forward"] / 2
    # every block's forward runs twice: 2 all-gathers and 2 reduce-scatters more per block
    for op, extra in (("all_gather", 2 * L), ("reduce_scatter", 2 * L)):
        assert re["comm"]["by_op"][op]["calls"] == plain["comm"]["by_op"][op]["calls"] + \
            STEPS * extra


# --------------------------------------------------------------------------- sequence parallel

def test_sequence_parallel_bytes_and_activations():
    """TP + SP at 2 ranks: per step, all-gathers before every column-parallel input (2 per
    block and the head's) and in the backward of every reduce-scatter and of the embedding's
    scatter; reduce-scatters the other way round; the LayerNorm and row-bias gradients summed.
    Activations: the LayerNorm inputs and statistics divided by TP."""
    tp, c = 2, cfg()
    s = lab("tensor_parallel", tp, "--sp")
    L, B, T, d = c.n_layer, 16, c.seq_len, c.d_model
    A = B * T * d * 4                     # one whole activation, bytes
    by = s["comm"]["by_op"]
    assert by["all_gather"]["calls"] == STEPS * (2 * L + 1 + 2 * L + 1)
    assert by["all_gather"]["bytes"] == STEPS * (4 * L + 2) * A
    assert by["reduce_scatter"]["calls"] == STEPS * (2 * L + 2 * L + 1)
    assert by["reduce_scatter"]["bytes"] == STEPS * (4 * L + 1) * A
    # the same volume as TP's 4L+1 all-reduces, plus the embedding's gather: each all-reduce
    # of A sends 2(t-1)/t A, a gather or a scatter (t-1)/t A
    sent = by["all_gather"]["sent_bytes"] + by["reduce_scatter"]["sent_bytes"]
    assert sent == pytest.approx(STEPS * (2 * (tp - 1) / tp * (4 * L + 1) * A
                                          + (tp - 1) / tp * A))
    f_sp = activation_formula_for(c, B, tp=tp, sp=True)
    f_tp = activation_formula_for(c, B, tp=tp, sp=False)
    for r in range(tp):
        f = activation_formula_for(c, B, tp=tp, sp=True, tp_rank=r)
        assert acts(s, r)["activations_peak"] == f["forward"]
    assert f_sp["block"]["layernorm_inputs"] * tp == f_tp["block"]["layernorm_inputs"]
    for k in ("layernorm_outputs", "attention", "mlp"):
        assert f_sp["block"][k] == f_tp["block"][k]


def test_sequence_parallel_bad_input(tmp_path):
    p, s = run_lab("tensor_parallel", 2, tmp_path, "--sp", "--seq-len", "33")
    assert p.returncode == 2 and s is None
    assert "--sp: the sequence length 33 is not divisible by the tensor parallel size 2" \
        in p.stderr
    p, s = run_lab("tensor_parallel", 1, tmp_path, "--sp")
    assert p.returncode == 2 and "--sp cuts the sequence over the tensor parallel ranks: run " \
        "with --nproc 2 or more" in p.stderr


# --------------------------------------------------------------------------- context parallel

# zig-zag at 2 and at 4 ranks (K/V passed on over several hops); contiguous at 2, where rank 0
# already skips every later rank's block and the imbalance 2W/(W+1) is 4/3
@pytest.mark.parametrize("w, layout", [(2, "zigzag"), (4, "zigzag"), (2, "contiguous")])
def test_ring_attention_equals_baseline(w, layout):
    c = cfg()
    s = lab("context_parallel", w, "--layout", layout)
    rows, L = 16, c.n_layer
    th = ring_attention_bytes(c, rows, w)
    assert s["comm"]["by_op"]["send"]["bytes"] == STEPS * th["send"]
    assert s["comm"]["by_op"]["send"]["calls"] == STEPS * L * (w - 1 + w - 1 + w)
    f = activation_formula_for(c, rows, cp=w)
    work = []
    for r in range(w):
        assert acts(s, r)["activations_peak"] == f["forward"]
        work.append(acts(s, r)["attention_entries"])
    T = c.seq_len
    if layout == "contiguous":   # rank r: r whole blocks of (T/W)^2 and its diagonal block
        assert work == [(r + 1) * (T // w) ** 2 for r in range(w)]
        assert max(work) / (sum(work) / w) == pytest.approx(2 * w / (w + 1))
    else:                        # 2W+1 blocks of (T/2W)^2 on every rank: balanced
        assert work == [(2 * w + 1) * (T // (2 * w)) ** 2] * w


def test_zigzag_chunks_and_pairs():
    assert layout_chunks(16, 2, 0, "zigzag") == [(0, 4), (12, 16)]
    assert layout_chunks(16, 2, 1, "zigzag") == [(4, 8), (8, 12)]
    assert layout_chunks(16, 2, 1, "contiguous") == [(8, 16)]
    # rank 0's queries [0,4) and [12,16) against rank 1's keys [4,8) and [8,12): only the late
    # chunk sees them, wholly (no mask)
    pairs = block_pairs(layout_chunks(16, 2, 0, "zigzag"), layout_chunks(16, 2, 1, "zigzag"))
    assert [(q.start, k.start, m is None) for q, k, m in pairs] == [(4, 0, True), (4, 4, True)]


def test_context_parallel_bad_input(tmp_path):
    p, s = run_lab("context_parallel", 4, tmp_path, "--seq-len", "36")
    assert p.returncode == 2 and s is None
    assert "--layout zigzag: the sequence length 36 must divide into 8 equal chunks at 4 ranks; " \
        "give --seq-len a multiple of 8" in p.stderr
    p, s = run_lab("context_parallel", 1, tmp_path)
    assert p.returncode == 2 and "runs on >=2 process(es), not 1" in p.stderr
    p, s = run_lab("context_parallel", 2, tmp_path, "--impl", "torch")
    assert p.returncode == 2
    assert "does not" not in p.stderr and "CUDA flash and memory-efficient SDPA" in p.stderr


@pytest.mark.parametrize("grid", [("--dp", "2", "--tp", "1"), ("--dp", "1", "--tp", "2")])
def test_context_parallel_in_the_grid(grid):
    """dp x cp and tp x cp at 4 ranks (a 4D grid with pp 1) equal the baseline."""
    s = lab("parallel3d", 4, *grid, "--pp", "1", "--cp", "2", "--microbatches", "1")
    assert s["extra"]["grid"]["cp"] == 2 and s["variant"].endswith("-cp2")


def test_the_docs_record_measures_the_formula():
    """The record the three long-sequence pages quote (that they equal it is
    tests/test_docs.py's check): every measured activation equals its formula."""
    import json

    from conftest import ROOT
    record = json.loads((ROOT / "docs/reference/long-sequences.json").read_text())
    # every measured activation equals its formula in the record itself
    for part in ("recompute", "sequence_parallel", "context_parallel"):
        assert record[part], f"{part}: the record holds no rows"
        assert all(r["measured"] == r["formula"] for r in record[part]), part
