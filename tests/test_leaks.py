"""tests/leaks.py, the check .ci/run makes after `make test`, on made-up machines: what it
counts as left behind, what it lets be, and that it says what and fails."""
import json
import os
from pathlib import Path

import leaks


def test_it_reads_namespaces_tables_and_links_from_the_tools_output():
    assert leaks.namespaces("dtlab-tst-tst1 (id: 0)\ndtlab-tst-tst2\n\n") == \
        ["dtlab-tst-tst1", "dtlab-tst-tst2"]
    assert leaks.nft_tables("table inet dtlab\ntable ip filter\ntable inet dtlab-x\n") == \
        ["table inet dtlab", "table inet dtlab-x"]
    assert leaks.links("1: lo: <LOOPBACK,UP> mtu 65536\n7: dtbr-tst: <BROADCAST> mtu 1500\n"
                       "9: dtv1-tst@if8: <BROADCAST> mtu 1500\n3: eth0: <UP> mtu 1500\n") == \
        ["dtbr-tst", "dtv1-tst"]


def test_dev_shm_entries_of_dtlab_and_torch_only(tmp_path):
    for name in ("dtlab-ring-0", "dtlab_seg", "sem.other", "torch_123_4_0"):
        (tmp_path / name).write_text("")
    assert leaks.shm_entries(tmp_path) == ["dtlab-ring-0", "dtlab_seg", "torch_123_4_0"]
    assert leaks.shm_entries(tmp_path / "missing") == []


def test_which_processes_are_a_runs():
    py = "/work/.venv/bin/python3"
    assert leaks.marked([py, "-u", "-m", "labs.ddp", "--steps", "3"], {}) == \
        "python -m labs.ddp"
    assert leaks.marked([py, "-m", "dtlab.launch.torchrun", "--standalone"], {}) == \
        "python -m dtlab.launch.torchrun"
    assert leaks.marked([py, "/work/.venv/bin/torchrun", "--nproc_per_node=2"], {}) == "torchrun"
    assert leaks.marked(["/usr/sbin/sshd", "-f", "/run/dtlab-cluster/tst/sshd-tst1.conf"], {})
    assert leaks.marked([py, "tests/tput.py", "srv"], {"DTLAB_CACHE": "/tmp/c"}) == \
        "started by the test session"
    assert leaks.marked([py, "worker.py"], {"TORCHELASTIC_RUN_ID": "x"}) == "a rank under torchrun"
    for other in (["/usr/sbin/sshd", "-D"], ["bash", "-c", "grep dtlab /etc/hosts"],
                  [py, "-m", "pytest", "tests/test_dtlab.py"], ["vim", "labs/ddp.py"]):
        assert leaks.marked(other, {"HOME": "/root"}) is None, other


def _fake_proc(root, pid, ppid, argv, env=None):
    d = root / str(pid)
    d.mkdir()
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + (b"\0" if argv else b""))
    (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in (env or {}).items()))
    (d / "stat").write_text(f"{pid} ({argv[0] if argv else 'kthread'}) S {ppid} 1 1 0")


def test_processes_of_a_fake_proc_skip_the_checker_and_its_parents(tmp_path):
    _fake_proc(tmp_path, 10, 1, ["bash", ".ci/run"], {"DTLAB_CACHE": "/tmp/c"})  # its parent
    _fake_proc(tmp_path, 11, 10, ["python3", "-m", "dtlab.x"])                     # the checker
    _fake_proc(tmp_path, 20, 1, ["python3", "-m", "labs.zero", "--stage", "3"])
    _fake_proc(tmp_path, 21, 1, [])                                                 # kernel thread
    _fake_proc(tmp_path, 22, 1, ["/usr/sbin/cron", "-f"])
    (tmp_path / "self").mkdir()
    assert leaks.processes(tmp_path, me=11) == [
        "pid 20 (python -m labs.zero): python3 -m labs.zero --stage 3"]


def test_check_names_each_leak_and_fails_and_lets_the_baseline_be(tmp_path, monkeypatch,
                                                                   capsys):
    before = {"network namespace": ["theirs"], "process": [], "/dev/shm entry": []}
    after = {"network namespace": ["theirs", "dtlab-tst-tst1"],
             "process": ["pid 20 (torchrun): torchrun --standalone"],
             "/dev/shm entry": ["dtlab-ring-0"], "nft table": []}
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(before))
    monkeypatch.setattr(leaks, "collect", lambda: after)
    assert leaks.main(["check", "--baseline", str(base)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["tests/leaks.py: the run left 3 thing(s) behind:",
                   "  network namespace dtlab-tst-tst1",
                   "  process pid 20 (torchrun): torchrun --standalone",
                   "  /dev/shm entry dtlab-ring-0"]
    monkeypatch.setattr(leaks, "collect", lambda: before)
    assert leaks.main(["check", "--baseline", str(base)]) == 0
    assert "nothing left behind" in capsys.readouterr().out
    snap = tmp_path / "snap.json"
    assert leaks.main(["snapshot", str(snap)]) == 0 and json.loads(snap.read_text()) == before


def test_a_rewritten_learner_state_is_a_leak_and_the_suite_keeps_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert leaks.learner_state() == []
    f = tmp_path / "dtlab" / "exercises.json"
    f.parent.mkdir()
    f.write_text("{}")
    before = {"learner state": leaks.learner_state()}
    assert leaks.leaks(before, before) == []
    os.utime(f, ns=(1, 1))  # the same file, written again by a test
    assert leaks.leaks({"learner state": leaks.learner_state()}, before) == [
        f"learner state {f} (2 bytes, modified 1)"]
    # conftest points the course's state at the session's own folder
    from dtlab.exercises import progress
    assert not str(progress.state_file()).startswith(str(Path.home() / ".local"))
