"""`dtlab memory` (dtlab/plan/memory_estimate.py): its model-state figures equal DeepSpeed's own
estimators where the assumptions match, its fp32 figures equal the bytes labs/zero.py counts from
live tensors (tests/test_zero.py runs that), and its activation figure equals the bytes autograd
saves in a real forward pass."""
import json
from dataclasses import replace

import pytest
import torch

from conftest import dtlab
from dtlab.measure.memory_meter import ActivationMeter
from dtlab.train.model import ToyGPT, build_model, config_from_preset, loss_fn
from dtlab.plan.memory_estimate import (Arch, Setup, activation_bytes, activation_detail,
                                 deepspeed_reference, model_states, parse_count)

LLAMA65 = Arch(n_layer=80, d_model=8192, n_head=64, d_ff=22016, vocab_size=32000, seq_len=2048)
ARCH = {10**9: Arch(24, 2048, 16, 5504, 32000, 2048), 7 * 10**9: Arch(32, 4096, 32, 11008, 32000,
                                                                      4096), 65 * 10**9: LLAMA65}


def test_parse_count():
    assert parse_count("7e9") == parse_count("7B") == parse_count("7b") == 7 * 10**9
    assert parse_count("350M") == 350 * 10**6 and parse_count("1.5T") == 1.5e12
    assert parse_count("27136") == 27136


@pytest.mark.deepspeed
@pytest.mark.parametrize("params", [10**9, 7 * 10**9, 65 * 10**9])
@pytest.mark.parametrize("gpn", [1, 4, 8])
@pytest.mark.parametrize("stage,offload", [(2, "none"), (2, "optimizer"), (3, "none"),
                                           (3, "optimizer"), (3, "param")])
def test_model_states_equal_deepspeed_estimators_on_one_node(params, gpn, stage, offload):
    s = Setup(params=params, gpus_per_node=gpn, precision="mixed", arch=ARCH[params])
    ours = model_states(s, stage, offload)
    ds_cpu, ds_gpu = deepspeed_reference(s, stage, offload, buffer_factor=1.5)
    # GPU: same bytes (DeepSpeed truncates to an int)
    assert ours["gpu"]["total"] == pytest.approx(ds_gpu, rel=1e-9, abs=1)
    # CPU: DeepSpeed multiplies its figure by additional_buffer_factor=1.5
    assert ours["cpu_per_node"]["total"] * 1.5 == pytest.approx(ds_cpu, rel=1e-9, abs=1)


@pytest.mark.deepspeed
def test_where_deepspeed_differs_it_is_more_conservative_across_nodes():
    # DeepSpeed's ZeRO-2 offload CPU figure per node is P x max(4 x all GPUs, 16): as if every
    # process of the job loaded its fp32 copy on this node, and as if this node held every
    # partition. Per node, only its own 2 processes load (4 B x 2) and it holds a quarter of the
    # 16 B/param partitions, so ours is max(8, 4) = 8 B/param where DeepSpeed says 32.
    s = Setup(params=7 * 10**9, nodes=4, gpus_per_node=2, precision="mixed", arch=ARCH[7 * 10**9])
    ours = model_states(s, 2, "optimizer")["cpu_per_node"]
    ds_cpu, ds_gpu = deepspeed_reference(s, 2, "optimizer", buffer_factor=1.0)
    assert ds_cpu == 32 * s.params
    assert ours["loading"] == 8 * s.params and ours["offloaded"] == 16 * s.params / 4
    assert ours["total"] == 8 * s.params
    assert ds_gpu == model_states(s, 2, "optimizer")["gpu"]["total"]


def test_zero_formula_by_category():
    """The one ZeRO formula (the lab asserts its live tensors against it, dtlab memory builds on
    it), category by category, written out by hand from the ZeRO paper's partitioning."""
    from dtlab.costmodel.zero_memory import zero_state_bytes
    P, W = 1000, 4
    cases = {  # (precision, stage, offload): (device params, grads, optimizer; cpu p, g, o)
        ("fp32", 0, "none"): (4 * P, 4 * P, 8 * P, 0, 0, 0),
        ("fp32", 1, "none"): (4 * P, 4 * P, 8 * P / W, 0, 0, 0),
        ("fp32", 2, "none"): (4 * P, 4 * P / W, 8 * P / W, 0, 0, 0),
        ("fp32", 3, "none"): (4 * P / W, 4 * P / W, 8 * P / W, 0, 0, 0),
        ("fp32", 1, "optimizer"): (4 * P, 4 * P, 0, 4 * P / W, 4 * P / W, 8 * P / W),
        ("fp32", 2, "optimizer"): (4 * P, 0, 0, 4 * P / W, 4 * P / W, 8 * P / W),
        ("fp32", 3, "param"): (0, 0, 0, 4 * P / W, 4 * P / W, 8 * P / W),
        ("mixed", 0, "none"): (2 * P, 2 * P, 16 * P, 0, 0, 0),
        ("mixed", 2, "none"): (2 * P, 2 * P / W, 16 * P / W, 0, 0, 0),
        ("mixed", 3, "none"): (2 * P / W, 0, 16 * P / W, 0, 0, 0),
        ("mixed", 3, "param"): (0, 0, 0, 2 * P / W, 0, 16 * P / W),
    }
    for (prec, stage, off), want in cases.items():
        got = zero_state_bytes(P, W, stage, off, prec)
        row = tuple(got[side][k] for side in ("device", "cpu")
                    for k in ("params", "grads", "optimizer"))
        assert row == pytest.approx(want), (prec, stage, off)
        assert got["device"]["total"] == pytest.approx(sum(want[:3]))


def test_estimate_is_the_formula_plus_the_layer_buffer():
    from dtlab.costmodel.zero_memory import zero_state_bytes
    P, W = 27136, 4
    s = Setup(params=P, gpus_per_node=W, precision="fp32", largest_layer=500)
    est = model_states(s, 3, "param")
    assert est["gpu"]["layer_buffer"] == 2 * 4 * 500
    assert est["gpu"]["total"] - 4000 == pytest.approx(
        zero_state_bytes(P, W, 3, "param")["device"]["total"])
    assert est["cpu_per_node"]["offloaded"] == pytest.approx(
        W * zero_state_bytes(P, W, 3, "param")["cpu"]["total"])


@pytest.mark.parametrize("name", ["tiny", "small", "long"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_activation_estimate_equals_saved_bytes(name, batch, recompute):
    """`dtlab memory`'s activation figure is what autograd really saves, byte for byte, with
    and without recomputation, and recomputation changes no gradient bit."""
    if name == "long" and batch == 16:
        batch = 4  # the same terms, a quarter of the work
    cfg = config_from_preset(name, vocab_size=13)
    x, y = (torch.randint(0, 13, (batch, cfg.seq_len)) for _ in range(2))
    grads = {}
    for mode in ("none", recompute):
        model = build_model(replace(cfg, recompute=mode))
        meter = ActivationMeter()
        with meter.measure(model.parameters()):
            loss = loss_fn(model(x), y)
        loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    s = Setup(params=ToyGPT.count_params(cfg), precision="fp32", batch=batch,
              arch=Arch(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.vocab_size,
                        cfg.seq_len), seq_len=cfg.seq_len)
    d = activation_detail(s, recompute)
    assert meter.last == d["forward"]
    assert meter.recompute_peak == d["recompute_peak"]
    assert torch.equal(grads["none"], grads[recompute])
    if recompute == "none":
        assert activation_bytes(s, checkpointing=False) == meter.last
    if recompute == "full":  # kept inputs plus the rest of one block while it is recomputed
        assert activation_bytes(s, checkpointing=True) == meter.last + meter.recompute_peak
        assert meter.last == d["embedding"] + d["head"] + cfg.n_layer * batch * cfg.seq_len * \
            cfg.d_model * 4


def test_65b_on_four_v100s():
    s = Setup(params=65 * 10**9, gpus_per_node=4, precision="mixed", arch=LLAMA65, batch=1,
              seq_len=2048)
    gb = 10**9
    acts = activation_bytes(s, checkpointing=True)
    need = {(st, off): model_states(s, st, off)["gpu"]["total"] + acts
            for st, off in [(2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "param")]}
    # only ZeRO-3 with parameters and optimizer on the CPU fits 32 GB per GPU ...
    assert [k for k, v in need.items() if v <= 32 * gb] == [(3, "param")]
    # ... and then the node needs 18 B/param of CPU memory: 1.17 TB (DeepSpeed adds 50%)
    assert model_states(s, 3, "param")["cpu_per_node"]["total"] == 18 * 65 * 10**9


def test_cli_json_and_table():
    p = dtlab("memory", "--preset", "small", "--gpus-per-node", "2", "--precision", "fp32",
              "--zero", "3", "--offload", "none", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    (row,) = r["rows"]
    P = r["setup"]["params"]
    assert P == ToyGPT.count_params(config_from_preset("small", vocab_size=256)) or P > 0
    assert row["gpu"]["params"] + row["gpu"]["grads"] + row["gpu"]["optimizer"] == 16 * P / 2
    p = dtlab("memory", "--params", "7B", "--gpus-per-node", "8", "--gpu-mem", "80")
    assert p.returncode == 0, p.stderr
    assert "7,000,000,000 parameters" in p.stdout and "fits 80 GB" in p.stdout


@pytest.mark.parametrize("args,message", [
    (["--params", "seven"], "--params 'seven'"),
    (["--params", "7B", "--zero", "5"], "--zero '5'"),
    (["--params", "7B", "--offload", "disk"], "--offload 'disk'"),
    ([], "give the model"),
    (["--preset", "huge"], "--preset"),
    (["--params", "7B", "--nodes", "0"], "--nodes must be >= 1"),
])
def test_cli_bad_input(args, message):
    p = dtlab("memory", *args)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


def test_recompute_under_autocast_and_without_input_grad():
    """The recomputation runs under the forward's autocast (bf16 here): gradients bit-equal to
    the run without it; a block whose input needs no gradient still trains its parameters."""
    cfg = replace(config_from_preset("tiny", vocab_size=13), n_layer=2)
    x, y = (torch.randint(0, 13, (4, cfg.seq_len)) for _ in range(2))
    grads = {}
    for mode in ("none", "full"):
        model = build_model(replace(cfg, recompute=mode))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.equal(grads["none"], grads["full"])
    block = build_model(replace(cfg, recompute="full")).layers[1]
    out = block(torch.randn(2, cfg.seq_len, cfg.d_model))  # an input without a graph
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
