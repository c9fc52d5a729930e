"""Model FLOPs per step: FlopCounterMode's count next to the 6N + attention formula, the peak
measured on the device, and MFU in every run record."""
import pytest
import torch

from dtlab.measure.flops import (PUBLISHED_PEAKS, SWEEP_CPU, flops_record, matmul_sweep,
                                 measure_peak_flops, published_peak)
from dtlab.train.model import config_from_preset, counted_flops_per_step, formula_flops_per_step


def _flops(cfg, batch=16):
    return counted_flops_per_step(cfg, batch), formula_flops_per_step(cfg, batch)


@pytest.mark.parametrize("name,rel", [("tiny", 0.03), ("small", 0.01)])
def test_formula_agrees_with_the_counter(name, rel):
    cfg = config_from_preset(name, vocab_size=13)
    counted, formula = counted_flops_per_step(cfg, 16), formula_flops_per_step(cfg, 16)
    # the formula leaves out the LM head's softmax, LayerNorms, GELU: a few percent at this size
    assert formula == pytest.approx(counted, rel=rel)
    # linear in the batch: the count is of the whole global batch
    assert counted_flops_per_step(cfg, 32) == 2 * counted


def test_peak_is_the_dtypes_measured_given_or_published(monkeypatch):
    sweep = matmul_sweep(torch.device("cpu"), "fp32")
    assert len(sweep) == len(SWEEP_CPU) and len({(r["m"], r["k"], r["n"]) for r in sweep}) > 3
    peak, how = measure_peak_flops(torch.device("cpu"), "fp32", sweep)
    assert peak == max(r["flops_per_s"] for r in sweep) and how.startswith("measured: best fp32")
    assert measure_peak_flops(torch.device("cpu"), "bf16")[1].startswith("measured: best bf16")
    tiny = config_from_preset("tiny", vocab_size=13)
    r = flops_record(*_flops(tiny), 0.01, 2, torch.device("cpu"), "fp16-master")
    assert r["dtype"] == "fp16"  # the dtype the run computes in, not the lab's variant name
    assert r["matmul_sweep"]  # fp16 is emulated on this CPU: the sweep keeps to its budget
    assert r["of_matmul_peak"] == pytest.approx(
        r["model_flops_per_step"] / 0.01 / r["matmul_peak_flops_per_s_per_device"])
    monkeypatch.setenv("DTLAB_PEAK_FLOPS", "1e12")
    assert measure_peak_flops(torch.device("cpu")) == (1e12, "DTLAB_PEAK_FLOPS")
    r = flops_record(*_flops(tiny), 0.01, 2, torch.device("cpu"))
    assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / 0.01 / 1e12)
    # a GPU the datasheet table knows is held to its dtype's published peak: bf16 is not
    # divided by an fp32 figure (which would inflate MFU ~15x on an H100)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    bf16, how = published_peak(torch.device("cuda"), "bf16")
    assert bf16 == PUBLISHED_PEAKS["H100"][0]["bf16"] and how.startswith("published: NVIDIA H100")
    assert bf16 / published_peak(torch.device("cuda"), "fp32")[0] > 14


def test_every_run_records_flops_and_mfu(shared_run):
    p, s, _ = shared_run("ddp", 2, "--steps", 3)
    assert p.returncode == 0, p.stderr
    f = s["flops"]
    assert f["model_flops_per_step"] == counted_flops_per_step(
        config_from_preset("tiny", vocab_size=13), 16)
    assert 0 < f["mfu"] <= 1 and 0 < f["of_matmul_peak"] <= 1 and f["dtype"] == "fp32"
    util = f["utilisation_per_rank"]
    assert len(util) == 2 and all(u["what"] == "cpu_cores_busy" for u in util)
    assert f["achieved_flops_per_s"] == pytest.approx(
        f["model_flops_per_step"] / s["time"]["step_s_median"])
