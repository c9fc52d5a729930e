"""``dtlab plan validate --measured-set playbook-h100``: the GPU step model against the Ultra-Scale
Playbook's measured H100 sweep (Hugging Face, 2025; docs/reference/measured/), leave one model
out. The figures asserted are the ones the model reaches today, each with a small margin: a
change that makes them worse fails here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtlab.errors import UsageError
from dtlab.plan import measured

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def record():
    return measured.validate_measured("playbook-h100")


def test_every_fold_predicts_the_held_out_model_within_the_targets(record):
    assert [f["held_out"] for f in record["folds"]] == ["1B", "3B", "8B"]
    for f in record["folds"]:
        t = f["time"]
        assert t["mape"] <= 0.105, (f["held_out"], t)          # reached 9.4-10.0%; target 15%
        assert t["spearman"] >= 0.98, (f["held_out"], t)       # reached 0.989-0.993
        assert abs(t["max_error"]) <= 0.5
        assert f["stalls"] <= 40                                # reached 9 / 35 / 34
        assert f["time_all_rows"]["mape"] <= 0.25               # every row, stalls too
        assert f["test_rows"] == t["rows"] + f["stalls"]
    assert record["fit_all_rows"]["time"]["mape"] <= 0.095     # reached 9.2%


def test_the_predicted_best_layout_is_within_5pct_in_10_of_12_cells(record):
    assert len(record["cells"]) == 12
    lomo = record["leave_one_model_out"]
    assert lomo["cells"] == 12 and lomo["cells_within_5pct"] >= 10
    for c in record["cells"]:
        assert c["within_5pct"] == (c["gap"] <= 0.05) and c["gap"] >= 0


def test_memory_within_15pct_on_most_rows(record):
    """Reached 77.8% of the rows (the target is 80%: not met, the record says so)."""
    assert record["leave_one_model_out"]["memory_within_15pct"] >= 0.77
    assert record["fit_all_rows"]["memory_within_15pct"] >= 0.77


def test_the_record_keeps_every_row_and_names_every_stall(record):
    rows = record["rows"]
    assert len(rows) == 661 and [r["row"] for r in rows] == list(range(661))
    stalls = [r for r in rows if r["stall"]]
    assert len(stalls) == len(record["stall_rows"]) == sum(f["stalls"] for f in record["folds"])
    for r in stalls:
        assert r["measured"]["step_s"] > measured.STALL * r["predicted"]["step_s"]
    for r in rows:
        if not r["stall"]:
            assert r["measured"]["step_s"] <= measured.STALL * r["predicted"]["step_s"]
    assert "Ultra-Scale Playbook" in record["source"]


def test_six_named_constants_with_their_meaning(record):
    for consts in [f["constants"] for f in record["folds"]] + [
            record["fit_all_rows"]["constants"]]:
        assert list(consts) == ["compute", "memory_bound", "per_layer", "comm", "cross_sync",
                                "overhead"]
        assert all(c["value"] >= 0 and c["meaning"] for c in consts.values())
    k = record["fit_all_rows"]["constants"]
    assert 0.8 < k["compute"]["value"] < 1.3          # near the MAMF rate, as it should be
    assert 2e-3 < k["per_layer"]["value"] < 6e-3     # a few ms of launches a block


def test_unknown_set_is_a_usage_error():
    with pytest.raises(UsageError, match="--measured-set 'nope'.*playbook-h100"):
        measured.load("nope")


def _dtlab(*args):
    return subprocess.run([sys.executable, "-m", "dtlab", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_record_and_the_plot(tmp_path):
    out = tmp_path / "rec.json"
    p = _dtlab("plan", "validate", "--measured-set", "playbook-h100", "--json", str(out),
               "--img", str(tmp_path / "img"))
    assert p.returncode == 0, p.stderr
    rec = json.loads(out.read_text())
    assert len(rec["rows"]) == 661 and len(rec["folds"]) == 3
    png = tmp_path / "img" / "plan-measured-h100.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held out" in p.stdout and "best layout within 5%" in p.stdout


def test_cli_bad_set_name_exits_2_with_one_line():
    p = _dtlab("plan", "validate", "--measured-set", "nope")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtlab: error: --measured-set 'nope'")
    assert "playbook-h100" in lines[0]
