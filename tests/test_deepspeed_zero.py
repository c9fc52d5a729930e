"""DeepSpeed's engine on the shared model (labs/deepspeed_zero.py) with every config in
launchers/configs/: equal to the baseline, the stage-3 parameters gathered and a merged fp32
checkpoint equal to them, the collectives DeepSpeed issued counted, under torchrun (under the
deepspeed launcher: tests/test_launchers.py). The first offload run builds DeepSpeed's cpu_adam op
(about 40 s)."""
import pytest

from conftest import run_lab
from dtlab.train.model import ToyGPT, config_from_preset

pytestmark = pytest.mark.deepspeed
pytest.importorskip("deepspeed")

P = ToyGPT.count_params(config_from_preset("tiny", vocab_size=13))


# every config at 2 ranks (stage 3 at 4 ranks partitions by the same code; the per-rank shares
# below are checked against the world size at 2 already)
@pytest.mark.parametrize("config,world", [
    ("ds_zero0", 2), ("ds_zero1", 2), ("ds_zero2", 2), ("ds_zero3", 2),
    ("ds_zero2_offload", 2), ("ds_zero3_offload", 2)])
def test_deepspeed_config_equals_baseline(config, world, tmp_path):
    steps = 4
    p, s = run_lab("deepspeed_zero", world, tmp_path, "--steps", steps, "--config", config,
                   timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert s["ok"] is True and s["baseline"]["ok"] is True
    ck = s["extra"]["checkpoint_to_fp32"]
    assert ck["same_names"] and ck["tensors"] == 31 and ck["max_abs_diff_vs_gathered"] == 0.0
    ops, stage = s["comm"]["by_op"], s["extra"]["stage"]
    if stage == 0:
        assert ops["all_reduce"]["bytes"] == steps * 4 * P
    elif stage in (1, 2):  # each bucket reduced to its owner, then the partitions all-gathered
        assert ops["reduce"]["bytes"] == steps * 4 * P
        assert ops["all_gather"]["bytes"] == steps * 4 * P
    else:
        assert ops["reduce_scatter"]["bytes"] == steps * 4 * P
        assert steps * 4 * P <= ops["all_gather"]["bytes"] <= 2 * steps * 4 * P
    for m in s["memory"]["per_rank"]:
        # AdamW moments, partitioned over the ranks from stage 1 (+ step counters)
        assert m["optimizer"] == pytest.approx(8 * P / (world if stage else 1), abs=128)
        if stage == 3:  # each rank keeps 1/W of every parameter
            assert m["params"] == pytest.approx(4 * P / world, rel=0.01)
        if stage >= 1:  # ZeRO keeps an fp32 partition of the weights even in fp32 training
            assert m["fp32_partitions"] == pytest.approx(4 * P / world, rel=0.01)


# DeepSpeed's launcher starting this lab (`deepspeed --num_gpus 2 --module labs.deepspeed_zero`,
# what launchers/deepspeed.sh runs): tests/test_launchers.py::test_deepspeed_launcher_on_this_machine


@pytest.mark.parametrize("content,message", [
    ('{"train_batch_size": 16,\n "zero_optimization": {"stage": 2},}', "not valid JSON at line 2"),
    ('{"zero_optimization": {"stage": 4}}', "stage must be 0, 1, 2 or 3"),
    ('{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}',
     "offload_param needs zero_optimization.stage 3"),
    ('{"fp16": {"enabled": true}}', "remove fp16/bf16"),
])
def test_bad_config_is_one_line(content, message, tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(content)
    p, _ = run_lab("deepspeed_zero", 2, tmp_path / "out", "--config", f)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr

# an unknown config name, answered with the known ones: tests/test_bad_input.py
# (test_cli_bad_input_exit_2_one_line)
