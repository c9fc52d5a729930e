"""Model FLOPs per step: FlopCounterMode's count next to the 6N + attention formula, the peak
measured on the device, and MFU in every run record."""
import pytest
import torch

from conftest import run_lab
from dtlab.core.model import config_from_preset
from dtlab.core.flops import (counted_flops_per_step, flops_record, formula_flops_per_step,
                              measure_peak_flops)


@pytest.mark.parametrize("name,rel", [("tiny", 0.03), ("small", 0.01)])
def test_formula_agrees_with_the_counter(name, rel):
    cfg = config_from_preset(name, vocab_size=13)
    counted, formula = counted_flops_per_step(cfg, 16), formula_flops_per_step(cfg, 16)
    # the formula leaves out the LM head's softmax, LayerNorms, GELU: a few percent at this size
    assert formula == pytest.approx(counted, rel=rel)
    # linear in the batch: the count is of the whole global batch
    assert counted_flops_per_step(cfg, 32) == 2 * counted


def test_peak_is_measured_or_given(monkeypatch):
    peak, how = measure_peak_flops(torch.device("cpu"))
    assert peak > 1e8 and "matmul" in how
    monkeypatch.setenv("DTLAB_PEAK_FLOPS", "1e12")
    assert measure_peak_flops(torch.device("cpu")) == (1e12, "DTLAB_PEAK_FLOPS")
    r = flops_record(config_from_preset("tiny", vocab_size=13), 16, 0.01, 2, torch.device("cpu"))
    assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / 0.01 / 1e12)


def test_every_run_records_flops_and_mfu(tmp_path):
    p, s = run_lab("ddp", 2, tmp_path, "--steps", 3)
    assert p.returncode == 0, p.stderr
    f = s["flops"]
    assert f["model_flops_per_step"] == counted_flops_per_step(
        config_from_preset("tiny", vocab_size=13), 16)
    assert 0 < f["mfu"] <= 1
    util = f["utilisation_per_rank"]
    assert len(util) == 2 and all(u["what"] == "cpu_cores_busy" for u in util)
    assert f["achieved_flops_per_s"] == pytest.approx(
        f["model_flops_per_step"] / s["time"]["step_s_median"])
