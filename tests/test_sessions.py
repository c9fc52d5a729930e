"""A job's processes end with it: a Ctrl-C, a SIGTERM or a deadline of ``dtlab run --nnodes 2``
stops both node agents and their ranks, each of which runs in a session of its own (as torchrun
starts ranks), and a timed-out command leaves nothing. Fake agents stand in for torchrun: no
namespace, no root."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dtlab.launch import sessions

AGENT = """
import subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[2])
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                        start_new_session=True)
(out / f"{sys.argv[1]}.agent").write_text(str(__import__("os").getpid()))
(out / f"{sys.argv[1]}.rank").write_text(str(rank.pid))
time.sleep(600)
"""

DRIVER = """
import sys, types
from dtlab.launch import launcher
agent, out, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
node = lambda name: types.SimpleNamespace(name=name)
cluster = types.SimpleNamespace(name="fk", nodes=2, cores_per_node=1,
                                all_nodes=lambda: [node("n1"), node("n2")])
launcher.Cluster = types.SimpleNamespace(load=lambda name: cluster)
launcher.node_argv = lambda c, n, argv: [sys.executable, agent, n.name, out]
sys.exit(launcher.torchrun("labs.ddp", [], launcher.Placement(1, 2, "fk"),
                           run_timeout=limit or None))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(pred, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "run-timeout"])
def test_a_stopped_multi_node_run_leaves_no_agent_and_no_rank(tmp_path, how):
    (tmp_path / "agent.py").write_text(AGENT)
    (tmp_path / "driver.py").write_text(DRIVER)
    limit = "4" if how == "run-timeout" else "0"
    drv = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "agent.py"),
                            str(tmp_path), limit], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        files = [tmp_path / f"n{i}.{kind}" for i in (1, 2) for kind in ("agent", "rank")]
        assert _wait_for(lambda: all(f.exists() and f.read_text() for f in files), 60), \
            drv.communicate(timeout=5)[0] if drv.poll() is not None else "agents never started"
        pids = [int(f.read_text()) for f in files]
        assert all(_alive(p) for p in pids)
        if how != "run-timeout":
            drv.send_signal(getattr(signal, how))
        out, _ = drv.communicate(timeout=60)
    finally:
        if drv.poll() is None:
            os.killpg(drv.pid, signal.SIGKILL)
    left = [p for p in pids if _alive(p)]
    for p in left:  # not the test's to leave either
        os.kill(p, signal.SIGKILL)
    assert not left, f"{how}: processes of the run still alive: {left}\n{out}"
    if how == "run-timeout":
        assert drv.returncode == 124, out
        assert "did not end within --run-timeout 4 s; stopped it" in out
    else:
        assert drv.returncode != 0


def test_a_timed_out_command_is_stopped_with_what_it_started(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(600)""")
    with pytest.raises(subprocess.TimeoutExpired):
        sessions.run([sys.executable, "-c", code], timeout=3)
    child = int(pidfile.read_text())
    assert _wait_for(lambda: not _alive(child), 5), f"its own-session child {child} survived"


def test_a_nested_job_is_still_part_of_the_outer_one():
    outer, inner = sessions.Job(), sessions.Job()
    env = inner.env(outer.env())
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                         start_new_session=True)
    try:
        assert _wait_for(lambda: p.pid in outer.pids() and p.pid in inner.pids(), 10)
        assert outer.stop() == [p.pid]
        p.wait(timeout=10)
    finally:
        p.kill()
        p.wait()
