"""`dtlab profile`: a trace per rank that TensorBoard's profiler plugin reads, and the
computation / communication / overlap summary, checked on synthetic intervals and on real runs."""
import json
from types import SimpleNamespace

import pytest

from conftest import chromium_or_skip, dtlab
from dtlab.measure.profiler import summarize


def ev(name, start, end):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


def test_summary_arithmetic():
    events = [ev("ProfilerStep#1", 0, 100),
              ev("aten::mm", 0, 40), ev("aten::add", 30, 50),      # computation 0-50
              ev("gloo:all_reduce", 45, 70),                        # communication 45-70
              ev("c10d::allreduce_", 44, 46),                       # (inside the union)
              ev("ProfilerStep#2", 100, 200), ev("aten::mm", 100, 120), ev("gloo:send", 150, 160)]
    s = summarize(events)
    us = s["us_per_step"]
    assert s["steps_profiled"] == 2
    # step 1: comp 50, comm 44-70 = 26, overlap 44-50 = 6, other 100 - 70 = 30
    # step 2: comp 20, comm 10, overlap 0, other 70
    assert us["computation"] == 35 and us["communication"] == 18 and us["overlap"] == 3
    assert us["other"] == 50 and us["exposed_communication"] == 15 and us["step"] == 100


PROFILED = {"ddp": ("--impl", "own", "--allreduce", "library", "--bucket-mb", "0.02"),
            "pipeline": ()}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """``profiled(lab)``: `dtlab profile LAB --nproc 2 --steps 6` made once, (process, folder),
    for the tests here that read it (the ddp one is also what TensorBoard is pointed at)."""
    runs = {}

    def get(lab):
        if lab not in runs:
            out = tmp_path_factory.mktemp(f"profile-{lab}")
            runs[lab] = dtlab("profile", lab, "--nproc", 2, "--steps", 6, "--out", out,
                              *PROFILED[lab], timeout=300), out
        return runs[lab]
    return get


@pytest.mark.parametrize("lab,comm_name", [("ddp", "gloo:all_reduce"), ("pipeline", "gloo:send")])
def test_profile_writes_traces_and_counts_every_communication(lab, comm_name, profiled):
    p, out = profiled(lab)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "computation" in p.stdout and "exposed comm" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    rows = s["extra"]["profile"]
    assert len(rows) == 2
    for r in rows:
        sh = r["share_of_step"]
        assert r["steps_profiled"] >= 3
        assert sh["communication"] > 0 and sh["computation"] > 0
        assert 0 <= sh["overlap"] <= min(sh["communication"], sh["computation"])
        # computation + communication - overlap + other = the whole step
        assert sh["computation"] + sh["communication"] - sh["overlap"] + sh["other"] == \
            pytest.approx(1.0, abs=1e-3)
    traces = sorted((out / "tb").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0", "rank1"]  # no baseline trace
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert comm_name in names and any(n and n.startswith("ProfilerStep") for n in names)


def test_tensorboard_plugin_and_browser_show_the_run(tmp_path, profiled):
    """TensorBoard with torch-tb-profiler over the ddp profile above: its HTTP API lists the run
    and both workers, and headless Chromium renders the plugin page (screenshot not blank)."""
    import shutil
    import subprocess
    import time
    import urllib.request

    from conftest import free_port
    pytest.importorskip("torch_tb_profiler")
    chromium = chromium_or_skip("the TensorBoard page screenshot")
    p, run = profiled("ddp")
    assert p.returncode == 0, p.stderr[-2000:]
    port = free_port()
    tb = subprocess.Popen([str(__import__("pathlib").Path(__import__("sys").executable)
                               .with_name("tensorboard")), "--logdir", str(run / "tb"),
                           "--host", "127.0.0.1", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler"

    def get(path):
        with urllib.request.urlopen(base + path, timeout=5) as r:
            return json.loads(r.read())

    try:
        deadline, runs = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            try:
                runs = get("/runs")
                if runs.get("runs") and not runs.get("loading"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs.get("runs") == ["tb"], (runs, tb.poll())
        assert "Distributed" in get("/views?run=tb")
        assert get("/workers?run=tb&view=Overview") == ["rank0", "rank1"]
        shot = tmp_path / "tb.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
                        "--window-size=1280,900", "--virtual-time-budget=8000",
                        f"--screenshot={shot}", f"http://127.0.0.1:{port}/#pytorch_profiler"],
                       capture_output=True, timeout=120)
        import matplotlib.image
        img = matplotlib.image.imread(str(shot))
        assert img.shape[0] >= 800 and img.shape[1] >= 1200
        assert img[..., :3].std() > 0.05  # not a blank page
        # TensorBoard's orange header bar is there: the app rendered, not an error page
        top = img[10:50, :, :3].reshape(-1, 3)
        assert ((top[:, 0] > 0.9) & (top[:, 1] > 0.4) & (top[:, 1] < 0.6) & (top[:, 2] < 0.1)).mean() > 0.5
    finally:
        tb.terminate()
        tb.wait(timeout=20)


def test_profile_compare_table(tmp_path):
    p = dtlab("profile", "compare", "--nproc", 2, "--steps", 4, "--out", tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    names = [r["strategy"] for r in rows]
    assert names[0] == "ddp torch" and "zero stage 3" in names and "pipeline 1f1b" in names
    for r in rows:
        assert r["computation"] + r["communication"] - r["overlap"] + r["other"] == \
            pytest.approx(1.0, abs=2e-3)
    # ZeRO-3 moves 1.5x what ZeRO-1 moves; the table carries the counted bytes
    by = {r["strategy"]: r for r in rows}
    assert by["zero stage 3"]["comm_bytes_per_step"] == pytest.approx(
        1.5 * by["zero stage 1"]["comm_bytes_per_step"])
    assert "| strategy |" in (tmp_path / "compare.md").read_text()
