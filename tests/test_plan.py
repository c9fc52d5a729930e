"""dtlab plan: the cost model's pieces against the labs' own formulas, the search and its command,
bad input, and `plan validate --set ci` (real runs; asserts that predictions and measurements
were produced and recorded, and that the predicted memory is the measured one to the byte)."""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dtlab.costmodel import shapes as cm
from dtlab.measure.comm_counter import RING_FACTORS
from dtlab.costmodel.zero_memory import zero_state_bytes
from dtlab.costmodel import step_time as st
from dtlab.plan import search as plan

ROOT = Path(__file__).resolve().parents[1]
SMALL = cm.Shape(4, 128, 4, 512, 13, 64)


def fake_calibration() -> dict:
    """A calibration with round numbers (1 ms + 1 ms a row a block, ...), so predictions can be
    checked by hand."""
    fit = {"block_fb": [1e-3, 1e-3], "block_f": [3e-4, 3e-4], "embed_fb": [1e-4, 0.0],
           "head_fb": [2e-4, 1e-4]}
    key = "h128-a4-f512-s64-v13"
    link = {w: [[1e-3, 1e-3, 1e9]] for w in ("2", "3", "4")}   # [gap, alpha, beta]
    return {"name": "test-calibration", "cores": 2,
            "compute": {key: {"1": {t: dict(fit) for t in ("1", "2", "4")},
                              "2": {t: dict(fit) for t in ("1", "2", "4")}}},
            "optimizer": {"1": [0.0, 1e-9], "2": [0.0, 1e-9]},
            "links": {"host": {op: dict(link) for op in
                               ("all_reduce", "all_gather", "reduce_scatter", "p2p")}}}


def test_cost_model_pieces_equal_the_labs_formulas():
    # ring bytes: the factor the comm counter charges
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        for n in (2, 3, 4, 8):
            assert cm.ring_factor(op, n) == pytest.approx(RING_FACTORS[op](n))
    # bubble: (P-1)/(M+P-1), interleaved and ZB-H1 forms (the pipeline report reads this one)
    assert cm.bubble(4, 8) == pytest.approx(3 / 11)
    assert cm.bubble(4, 8, "interleaved", 2) == pytest.approx(3 / 19)
    assert cm.bubble(4, 8, "zbh1") == pytest.approx(3 / 27)
    # ZeRO: without padding (every unit a multiple of dp) the exact count is the formula's, plus
    # one 4-byte step counter a unit
    P = cm.total_params(SMALL)
    assert all(n % 2 == 0 for n, _ in cm.zero_units(SMALL, 2))
    for stage in (1, 2, 3):
        f = zero_state_bytes(P, 2, stage)["device"]
        got = cm.zero_states(SMALL, 2, stage)
        assert got["optimizer"] == f["optimizer"] + 4 * (SMALL.n_layer + 2)
        assert got["params"] == f["params"]
        # stage 1 keeps the full gradients and its slice's reduced ones beside them
        assert got["grads"] == f["grads"] + (4 * P // 2 if stage == 1 else 0)
    off = cm.zero_states(SMALL, 2, 2, "optimizer")
    assert (off["optimizer"], off["grads"]) == (0, 0)
    # TP bytes: (4L + 1) A + 12 N per rank, times 2(tp-1)/tp
    a = 16 * 64 * 128 * 4
    assert cm.sent_bytes(SMALL, 16, tp=2)["tp"] == pytest.approx(
        (4 * 4 + 1) * a + 12 * 16 * 64)


def test_step_time_adds_up_by_hand():
    c = st.ClusterSpec(nodes=1, per_node=2, cores=2)
    calib = fake_calibration()
    comp, links = st.Compute(SMALL, c, calib), st.Links(c, calib)
    # DDP over 2 ranks: 8 rows a rank; 4 blocks x (1 + 8) ms + embedding 0.1 + head 0.2+0.8 ms
    t = st.step_time(SMALL, 16, st.Layout(dp=2), c, comp, links)
    assert t["compute"] == pytest.approx(4 * 9e-3 + 1e-4 + 1e-3)
    assert t["optimizer"] == pytest.approx(cm.total_params(SMALL) * 1e-9)
    grads = 4 * cm.total_params(SMALL)
    buckets = [2**20, grads - 2**20]             # torch DDP: a 1 MiB first bucket, then 25 MiB
    assert t["comm"]["dp"] == pytest.approx(sum(1e-3 + b / 1e9 for b in buckets))
    # a 2-stage pipeline with 4 micro-batches of 4 rows: slot = the slower stage's F+B
    t = st.step_time(SMALL, 16, st.Layout(pp=2, microbatches=4), c, comp, links)
    slot = 2 * 5e-3 + 2e-4 + 4e-4
    assert t["compute"] == pytest.approx(4 * slot)
    assert t["bubble"] == pytest.approx(1 * slot)
    assert t["bubble"] / (t["compute"] + t["bubble"]) == pytest.approx(cm.bubble(2, 4))
    act = 4 * 64 * 128 * 4
    assert t["comm"]["pp"] == pytest.approx((4 + 1) * 2 * (1e-3 + act / 1e9))


def test_search_ranks_fitting_layouts_and_prints_a_command_the_lab_accepts():
    c = st.ClusterSpec(nodes=1, per_node=2, cores=2, memory=64 * 2**20)
    res = plan.plan(SMALL, 16, c, plan.Search(), fake_calibration())
    ranked = res["ranked"]
    assert ranked and all(p["fits"] for p in ranked)
    times = [p["time"]["total"] for p in ranked]
    assert times == sorted(times)
    assert all("why_not_best" in p for p in ranked[1:])
    labels = {p["label"] for p in ranked}
    assert {"dp2", "dp1 tp2", "dp2 zero3"} <= labels
    # the command of every ranked layout parses: dtlab's own parser, then the lab's
    from dtlab.cli import make_parser
    for p in ranked:
        cmd = plan.command_for(st.Layout(**p["layout"]), "small", 16, c)
        argv = shlex.split(cmd)[1:]
        args, rest = make_parser().parse_known_args(argv)
        assert args.command == "run"
        mod = __import__(f"labs.{args.lab}", fromlist=["make_parser"])
        mod.make_parser().parse_args(rest)


def run_plan(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtlab", "plan", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


A100 = ["--layers", "32", "--d-model", "4096", "--heads", "32", "--seq", "4096",
        "--batch", "512", "--devices-per-node", "8", "--device-memory", "80GiB",
        "--peak-flops", "312e12", "--intra", "3,300"]


@pytest.mark.parametrize("argv,message", [
    (["--preset", "small", "--device-memory", "1MiB", "--calibration", "CAL"],
     "the model fits nowhere"),
    (A100 + ["--nodes", "1", "--inter", "10,200"], "--nodes is 1"),
    (A100 + ["--nodes", "4"], "needs the links between nodes"),
    (A100 + ["--nodes", "2", "--inter", "10,4000"], "more than --intra"),
    (A100 + ["--nodes", "2", "--inter", "10,200", "--tp", "0"], "--tp '0': each must be >= 1"),
    (["--preset", "small", "--ffn", "64", "--peak-flops", "1e12"], "not both"),
    (["--layers", "4", "--d-model", "100", "--heads", "3", "--peak-flops", "1e12"],
     "not a multiple of --heads"),
    (["--preset", "small"], "--peak-flops"),
    (["--preset", "small", "--calibration", "/nonexistent.json"], "no such file"),
    (A100 + ["--nodes", "2", "--inter", "10,200", "--tp", "3"], "no layout"),
])
def test_bad_input_is_one_clear_line(argv, message, tmp_path):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(fake_calibration()))
    p = run_plan(*[str(cal) if a == "CAL" else a for a in argv])
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_worked_example_many_a100_nodes(tmp_path):
    """Datasheet inputs (no calibration): a ranking whose best fits the GPUs, the layout in words
    (no preset has the shape), and the sbatch line a preset of 4 nodes would get."""
    out = tmp_path / "a100.json"
    p = run_plan(*A100, "--nodes", "4", "--inter", "10,200", "--json", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    best = res["ranked"][0]
    assert best["memory"]["total"] <= 80 * 2**30
    assert res["command"].startswith(best["label"])
    c = st.ClusterSpec(nodes=4, per_node=8)
    cmd = plan.command_for(st.Layout(**best["layout"]), "small", 512, c)
    assert cmd.startswith("NPROC_PER_NODE=8 sbatch -N 4 slurm/torchrun.sbatch ")
    assert "predictions" in p.stdout and "not measurements" in p.stdout


def test_validate_ci_set_records_predictions_and_measurements(tmp_path):
    rec = tmp_path / "validate.json"
    p = run_plan("validate", "--set", "ci", "--out", str(tmp_path / "cal.json"), "--json",
                 str(rec), "--work", str(tmp_path / "runs"), "--steps", "4")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    d = json.loads(rec.read_text())
    assert d["calibration"] == json.loads((tmp_path / "cal.json").read_text())["name"]
    assert len(d["layouts"]) == 3
    for r in d["layouts"]:
        for k in ("step_s", "memory"):
            assert math.isfinite(r["predicted"][k]) and r["predicted"][k] > 0
            assert math.isfinite(r["measured"][k]) and r["measured"][k] > 0
        assert r["predicted"]["memory"] == r["measured"]["memory"], r["label"]  # exact
    assert (tmp_path / "validate.png").stat().st_size > 0


def test_the_validation_record_is_whole():
    """The validation docs/plan.md quotes (that the page equals it is tests/test_docs.py's
    check) is whole: 30+ layouts, each with a prediction and a measurement, and its memory
    exact but for CP."""
    rec = json.loads((ROOT / "docs/reference/plan-validate.json").read_text())
    assert len(rec["layouts"]) >= 30 and rec["calibration"]
    for r in rec["layouts"]:
        assert r["measured"]["step_s"] > 0 and r["predicted"]["step_s"] > 0
        if r["layout"].get("cp", 1) == 1:
            assert r["ape_memory"] == 0, r["label"]
