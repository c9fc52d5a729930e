"""Model, data and record building blocks, in one process."""
import dataclasses
import pytest
import torch

from dtlab.measure import run_record as record
from dtlab.measure.comm_counter import CommCounter, ring_sent_bytes
from dtlab.train.data import Corpus, DataError, check_divisible, rank_slice
from dtlab.train.model import ModelConfig, ToyGPT, config_from_preset, loss_fn, preset


def test_same_seed_same_weights_and_other_seed_differs():
    cfg = ModelConfig()
    torch.manual_seed(123)  # the global RNG must not matter
    a = ToyGPT(cfg).state_dict()
    torch.manual_seed(456)
    b = ToyGPT(cfg).state_dict()
    c = ToyGPT(ModelConfig(init_seed=1)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("text", [False, True])
def test_rank_slices_reassemble_the_global_batch(world, text, tmp_path):
    path = None
    if text:
        path = tmp_path / "t.txt"
        path.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    c = Corpus(16, 32, seed=3, path=str(path) if path else None)
    for step in (0, 1, 7):
        x, y = c.global_batch(step)
        assert x.shape == y.shape == (16, 32)
        parts = [rank_slice(x, r, world) for r in range(world)]
        assert all(p.shape[0] == 16 // world for p in parts)
        assert torch.equal(torch.cat(parts), x)
        # Pure function of (seed, step): another corpus object produces the same batch.
        x2, y2 = Corpus(16, 32, seed=3, path=str(path) if path else None).global_batch(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(c.global_batch(0)[0], c.global_batch(1)[0])


def test_targets_are_next_tokens_and_text_is_valid_arithmetic():
    c = Corpus(4, 64, seed=0)
    x, y = c.global_batch(5)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:
        lines = c.decode(row).split("\n")[1:-1]  # whole problems only
        assert lines
        for line in lines:
            lhs, rhs = line.split("=")
            a, b = lhs.split("+")
            assert int(a) + int(b) == int(rhs)


def test_batch_divisibility_and_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"--batch-size 16 is not divisible .* 3; use a multiple"):
        check_divisible(16, 3)
    with pytest.raises(DataError, match="no such file"):
        Corpus(2, 8, path=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(DataError, match="needs seq_len\\+1 = 9"):
        Corpus(2, 8, path=str(short))


def test_model_shapes_stages_and_loss():
    cfg = config_from_preset("tiny", vocab_size=13)
    m = ToyGPT(cfg)
    x = torch.randint(0, 13, (3, cfg.seq_len))
    logits = m(x)
    assert logits.shape == (3, cfg.seq_len, 13)
    # initial loss is close to uniform over the vocabulary
    assert abs(loss_fn(logits, x).item() - torch.log(torch.tensor(13.0)).item()) < 0.1
    for n in (1, 2):
        stages = m.stages(n)
        h = x
        for st in stages:
            h = st(h)
        assert torch.equal(h, logits)
        assert sum(len(s) for s in stages) == len(m.layers)
    with pytest.raises(ValueError, match="pipeline stages"):
        m.stages(3)
    assert ToyGPT.count_params(cfg) == m.num_params()
    for variant in (dict(fused_qkv=True), dict(moe_experts=3, moe_top_k=2), dict(d_ff=40)):
        c = dataclasses.replace(cfg, **variant)
        assert ToyGPT.count_params(c) == ToyGPT(c).num_params(), variant


def test_gpt2_preset_parameter_count():
    # GPT-2 small's famous 124M (tied embeddings) is 163M with an untied head of 50257 x 768,
    # minus the 3 x 768 q/k/v biases per block that ToyGPT leaves out.
    cfg = config_from_preset("gpt2-124m", vocab_size=13)
    n = ToyGPT.count_params(cfg)
    tied_gpt2 = 124_439_808
    assert n == tied_gpt2 + 50257 * 768 - 12 * 3 * 768
    assert preset("gpt2-124m")["batch_size"] == 8


def test_unknown_preset_message():
    with pytest.raises(KeyError, match="unknown preset 'huge'; choose one of: tiny, small"):
        preset("huge")


def test_comm_counter_ring_model():
    c = CommCounter(world_size=4)
    c.record("all_reduce", torch.zeros(1000))  # 4000 B payload; ring: 2*3/4*4000 = 6000 B sent
    c.record("send", 100, sent_bytes=100)
    c.end_step()
    c.record("all_reduce", torch.zeros(1000))
    c.end_step()
    s = c.summary()
    assert s["by_op"]["all_reduce"] == {"calls": 2, "bytes": 8000, "sent_bytes": 12000.0}
    assert c.step_sent == [6100.0, 6000.0]
    assert s["bytes_per_step"] == 6050.0 and s["calls_per_step"] == 1.5
    assert ring_sent_bytes("all_gather", 800, 4) == 600
    with pytest.raises(KeyError, match="no ring model"):
        ring_sent_bytes("send", 1, 2)


def test_compare_flags_drift():
    p = {"w": torch.zeros(3)}
    ok = record.compare([2.0, 1.0], p, [2.0, 1.0], {"w": torch.zeros(3)}, record.FP32_TOLERANCE)
    assert ok["ok"] and ok["max_abs_param_diff"] == 0
    bad = record.compare([2.0, 1.001], p, [2.0, 1.0], {"w": torch.zeros(3)},
                         record.FP32_TOLERANCE)
    assert not bad["ok"] and bad["max_rel_loss_diff"] == pytest.approx(1e-3)
    badp = record.compare([2.0], {"w": torch.tensor([0, 0, 1e-3])}, [2.0], {"w": torch.zeros(3)},
                          record.FP32_TOLERANCE)
    assert not badp["ok"] and badp["worst_param"] == "w"
