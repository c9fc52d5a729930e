"""The dtlab command as a user meets it: listing, bad input, the record's fields, the tour."""
import json

import pytest

from conftest import dtlab, run_lab
from labs.core.record import SUMMARY_FIELDS


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "unknown lab 'nope'; `dtlab list` shows the labs"),
    (["run", "ddp", "--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["run", "ddp", "--nproc", "3"],
     "--batch-size 16 is not divisible by the data-parallel world size 3; use a multiple of 3"),
    (["run", "ddp", "--nproc", "2", "--batch-size", "5"],
     "--batch-size 5 is not divisible by the data-parallel world size 2"),
    (["run", "ddp", "--preset", "huge"], "--preset: unknown preset 'huge'; choose one of: tiny"),
    (["run", "baseline", "--nproc", "2"], "lab 'baseline' runs on 1 process(es), not 2"),
    (["run", "ddp", "--nproc", "2", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["run", "ddp", "--nproc", "2", "--data", "/nonexistent.txt"], "--data /nonexistent.txt: no such"),
    (["tour", "--only", "nope"], "--only: unknown lab 'nope'"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    p = dtlab(*args, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("dtlab: error: ") and message in lines[0], lines[0]


def test_list_shows_every_lab():
    p = dtlab("list", timeout=60)
    assert p.returncode == 0
    for name in ("baseline", "ddp"):
        assert name in p.stdout
    assert "ready" in p.stdout


def test_summary_has_every_documented_field(tmp_path):
    p, s = run_lab("ddp", 2, tmp_path, "--steps", 3)
    assert p.returncode == 0, p.stderr
    for field in SUMMARY_FIELDS:
        assert field in s, field
    assert set(s["baseline"]) >= {"max_abs_loss_diff", "max_abs_param_diff", "tolerance", "ok"}
    assert set(s["time"]) == {"step_s_median", "tokens_per_s", "wall_s"}
    assert set(s["comm"]) >= {"bytes_per_step", "calls_per_step", "by_op"}
    assert len(s["memory"]["per_rank"]) == 2
    for m in s["memory"]["per_rank"]:
        assert set(m) == {"params", "grads", "optimizer", "activations_peak", "peak"}
        n = s["n_params"]
        assert m["params"] == 4 * n and m["grads"] == 4 * n
        # AdamW: exp_avg and exp_avg_sq (4 B each per parameter) plus a scalar step per tensor
        assert 8 * n <= m["optimizer"] <= 8 * n + 4 * 64
        assert m["activations_peak"] > 0 and m["peak"] > m["params"]
    assert (s["backend"], s["device"], s["dtype"], s["preset"]) == ("gloo", "cpu", "fp32", "tiny")
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    # the table on screen carries the verdict
    assert "ddp" in p.stdout and "yes" in p.stdout


def test_outside_tolerance_exits_nonzero(tmp_path):
    """A strategy that drifts from the baseline must fail the run (exit 1), not just print."""
    import argparse

    from labs.core.train import Strategy, add_common_args, run_lab as run_lab_main

    class Drifting(Strategy):
        variant = "drifting"

        def make_optimizer(self, params):  # a learning rate 1% off the baseline's
            return __import__("torch").optim.AdamW(params, lr=self.settings.lr * 1.01,
                                                   betas=(0.9, 0.95), weight_decay=0.0)

    parser = add_common_args(argparse.ArgumentParser())
    rc = run_lab_main("drift", parser, lambda rt, s, a: Drifting(rt, s),
                      ["--steps", "5", "--out", str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 1 and s["baseline"]["ok"] is False
    assert s["baseline"]["max_abs_param_diff"] > s["baseline"]["tolerance"]["param_abs"]


def test_tour_prints_one_table_and_report(tmp_path):
    p = dtlab("tour", "--steps", 5, "--out", tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dtlab tour" in p.stdout
    report = (tmp_path / "report.md").read_text()
    assert "| baseline |" in report and "| ddp |" in report
