"""The dtlab command as a user meets it: listing, bad input, the record's fields, the tour."""
import json
import shutil
import subprocess

import pytest

from conftest import ROOT, chromium_or_skip, dtlab
from dtlab.measure.run_record import SUMMARY_FIELDS


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


def test_summary_has_every_documented_field(shared_run):
    p, s, tmp_path = shared_run("ddp", 2, "--steps", 3)
    assert p.returncode == 0, p.stderr
    for field in SUMMARY_FIELDS:
        assert field in s, field
    assert set(s["baseline"]) >= {"max_abs_loss_diff", "max_abs_param_diff", "tolerance", "ok"}
    assert set(s["time"]) == {"step_s_median", "tokens_per_s", "wall_s"}
    assert set(s["comm"]) >= {"bytes_per_step", "calls_per_step", "by_op"}
    assert len(s["memory"]["per_rank"]) == 2
    for m in s["memory"]["per_rank"]:
        assert set(m) == {"params", "grads", "optimizer", "activations_peak",
                          "recompute_peak", "peak"}
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

    from dtlab.harness import add_common_args, run_lab as run_lab_main
    from dtlab.train.loop import Strategy

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


# The README's tour on the labs whose rows the report's checks read; every lab's own runs are
# asserted in its tests, and the full tour costs this suite two more minutes.
TOUR_LABS = ("baseline", "dataparallel", "ddp", "amp", "pipeline")


def test_tour_plans_every_variant(tmp_path):
    """The whole tour's plan (nothing run): every lab that can run here is in it, with the newer
    variants, and every request was validated."""
    from dtlab import registry
    from dtlab.report.tour import plan
    runs, skipped = plan(None, None, None, 4, tmp_path)
    titles = {r.title for r in runs}
    assert {"tensor_parallel --sp --recompute full", "context_parallel --layout contiguous",
            "pipeline --schedule zbh1", "pipeline --schedule interleaved --preset small",
            "expert_parallel --moe-experts 4 --moe-top-k 2 --capacity-factor 1.0"} <= titles
    runnable = {n for n, lab in registry.LABS.items() if not lab.missing() and not lab.gpu_only}
    assert {r.lab.name for r in runs} == runnable
    assert all(why.startswith("needs CUDA") for _, why in skipped)


def test_tour_report_md_html_and_pictures(tmp_path):
    """The README's main command: every variant of the labs chosen, the report in markdown and
    in HTML (pictures inside, opens from a file), loss/memory/communication/schedule pictures."""
    from dtlab import registry
    p = dtlab("tour", "--steps", 4, "--out", tmp_path, "--only", ",".join(TOUR_LABS),
              "--json", tmp_path / "record.json", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "dtlab tour" in p.stdout and "runs in" in p.stdout
    runnable = [registry.LABS[name] for name in TOUR_LABS
                if not registry.LABS[name].missing() and not registry.LABS[name].gpu_only]
    import torch
    cuda = torch.cuda.is_available()
    expected = sum(1 + len(lab.tour_more) + (len(lab.tour_gpu) if cuda else 0) for lab in runnable)
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == expected + 1  # the header and one row per run
    assert rows[1].startswith("| baseline | single | 1 | - | - | - |")  # the reference itself
    oks = [line.split(" | ")[5] for line in rows[2:]]
    assert all(ok == "yes" or ok.startswith("ok (") for ok in oks), report
    # the AMP run with an overflow injected on purpose reads as ok, with the reason
    assert "| amp | fp16-own | 2 |" in report and "ok (1 step skipped)" in oks, report
    assert "| pipeline | own-zbh1 | 2 |" in report and "| pipeline | own-interleaved-v2 | 2 |" \
        in report
    if not cuda:  # the GPU-only variants are listed with the reason
        assert "- skipped dataparallel --impl torch: needs CUDA: nn.DataParallel itself needs " \
               "CUDA" in report and "- skipped ddp --backend nccl: needs CUDA" in report
    # the record docs/ is rendered from: the same runs, the same table rows, the machine
    import json
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec == json.loads((tmp_path / "tour.json").read_text())
    assert len(rec["runs"]) == expected and rec["machine"]["cores"] and rec["machine"]["torch"]
    from dtlab.docsgen.lab_figures import tour_table
    assert [r for r in tour_table(rec).splitlines() if r.startswith("| ") and "---" not in r] \
        == rows
    exposed = [line.split(" | ")[9] for line in rows[1:]]
    assert sum(e.endswith("%") for e in exposed) >= expected - 1  # every run but the baseline
    pics = ["loss.png", "memory.png", "comm.png", "schedule-own-1f1b.png",
            "schedule-own-gpipe.png"]
    for name in pics:
        assert (tmp_path / name).stat().st_size > 10_000, name
        assert f"]({name})" in report
    page = (tmp_path / "report.html").read_text()
    n_png = len(list(tmp_path.glob("*.png")))
    assert n_png >= len(pics) and page.count("src='data:image/png;base64,") == n_png
    assert page.count("<tr>") == expected + 1
    # the report files passed every check above; the last one opens the page in a browser
    chromium = chromium_or_skip("opening report.html in a browser")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    url = (tmp_path / "report.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<h1>dtlab tour</h1>" in dom and dom.count("<img") == n_png
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, "--window-size=1280,2000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    import matplotlib.image
    img = matplotlib.image.imread(str(shot))
    assert img[..., :3].std() > 0.05  # a rendered page with a table and pictures, not blank


def test_tour_exits_nonzero_when_a_lab_drifts(tmp_path, monkeypatch):
    """A lab outside its tolerance turns the whole tour red: exit status 1, named in the report."""
    from dtlab import cli, registry

    class TestLab(registry.Lab):
        @property
        def module(self):
            return "drift_lab"  # tests/drift_lab.py: DDP with a learning rate 1% off

    monkeypatch.setitem(registry.LABS, "drift", TestLab("drift", "drifts on purpose"))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}:{ROOT}")
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    rc = cli.main(["tour", "--only", "baseline,drift", "--steps", "3", "--out", str(tmp_path)])
    assert rc == 1
    report = (tmp_path / "report.md").read_text()
    assert "| drift | drifting | 2 |" in report and "| NO |" in report
    assert "1 NOT OK" in report and "- FAILED drift:" in report


