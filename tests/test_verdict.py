"""A verdict that cannot lie: a NaN or an infinity anywhere (loss or parameter, run or baseline)
fails the run, whatever else the comparison says; the record stays strict JSON; a run that
differs from the baseline on purpose reads as ok with the reason, a real failure as NO."""
import json
import math

import torch
from hypothesis import given, settings, strategies as st

from conftest import run_lab
from dtlab.measure import run_record as record
from dtlab.report.tables import verdict_word

TOL = {"loss_rel": 1e-5, "param_abs": 1e-4}
special = st.sampled_from([float("nan"), float("inf"), float("-inf")])
finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(base=st.lists(finite, min_size=1, max_size=12), data=st.data())
def test_no_input_reports_ok_with_a_nonfinite_number(base, data):
    n = len(base)
    losses = data.draw(st.lists(st.one_of(finite, special), min_size=n, max_size=n))
    base_losses = data.draw(st.one_of(st.just(base), st.lists(st.one_of(finite, special),
                                                                min_size=n, max_size=n)))
    values = data.draw(st.lists(st.one_of(finite, special), min_size=6, max_size=6))
    params = {"a": torch.tensor(values[:4]).reshape(2, 2), "b": torch.tensor(values[4:])}
    base_params = {"a": torch.zeros(2, 2), "b": torch.zeros(2)}
    if data.draw(st.booleans()):  # or the baseline's parameters are the broken ones
        params, base_params = base_params, params
    cmp = record.compare(losses, params, base_losses, base_params, TOL)
    nonfinite = record.first_nonfinite(losses, params)
    anything_bad = not all(map(math.isfinite, losses + base_losses + values))
    if anything_bad:
        assert cmp["ok"] is False and "nonfinite" in cmp
        assert record.verdict(cmp, True, nonfinite) is False
    # whatever happened, the record is strict JSON (no NaN/Infinity tokens)
    json.loads(json.dumps(record._strict(cmp), allow_nan=False))


def test_first_nonfinite_names_the_step_and_the_parameter():
    params = {"b.weight": torch.tensor([1.0, float("inf")]), "a.bias": torch.zeros(2)}
    nf = record.first_nonfinite([2.5, 2.4, float("nan"), float("nan")], params)
    assert nf == {"first_step": 2, "loss": "nan", "first_param": "b.weight"}
    assert record.describe_nonfinite(nf) == ("the loss is nan from step 2; parameter b.weight "
                                             "is not finite")
    assert record.first_nonfinite([1.0], {"w": torch.ones(3)}) is None


def test_a_diverged_run_exits_1_naming_the_step(tmp_path):
    """fp32 without a loss scaler and an inf put into a gradient at step 3: the weights turn
    to NaN, the loss is NaN from step 4; the run must fail, not compare NaN as 'equal'."""
    p, s = run_lab("amp", 1, tmp_path, "--dtype", "fp32", "--scaler", "none",
                   "--inject-overflow-at", 3, "--steps", 8)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "the run diverged: the loss is nan from step 4" in p.stderr
    assert s["ok"] is False and s["baseline"]["ok"] is False
    assert s["nonfinite"]["first_step"] == 4 and s["nonfinite"]["first_param"]
    assert s["losses"][4] is None and s["baseline"]["max_abs_param_diff"] is None
    json.loads((tmp_path / "summary.json").read_text(),
               parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert "NO (diverged)" in p.stdout


def _summary(ok, base_ok, note=None, nonfinite=None):
    b = {"ok": base_ok, **({"note": note} if note else {})}
    return {"ok": ok, "baseline": b, **({"nonfinite": nonfinite} if nonfinite else {})}


def test_the_ok_column_says_what_happened():
    assert verdict_word(_summary(True, True)) == "yes"
    assert verdict_word(_summary(True, None, "1 step skipped")) == "ok (1 step skipped)"
    assert verdict_word(_summary(True, None)) == "-"  # not compared (--no-baseline)
    assert verdict_word(_summary(False, False)) == "NO"
    assert verdict_word(_summary(False, True)) == "checks FAILED"
    assert verdict_word(_summary(False, False, nonfinite={"first_step": 4})) == "NO (diverged)"


def test_atomic_write_keeps_the_mode_and_makes_new_files_readable(tmp_path):
    """A rewritten file keeps its mode (a private one stays private); a new one is 0644 (the
    temporary file mkstemp makes is 0600, and a rename would have kept that); nothing is left
    beside it."""
    import os
    import stat
    new = tmp_path / "page.md"
    record.atomic_write_text(new, "one\n")
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o644 and new.read_text() == "one\n"
    private = tmp_path / "key.json"
    private.write_text("{}")
    private.chmod(0o600)
    record.atomic_write_text(private, "{\"a\": 1}")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600 and private.read_text() == "{\"a\": 1}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json", "page.md"]
