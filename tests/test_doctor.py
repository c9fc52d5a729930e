"""`dtlab doctor` and its hostfile parser. The parser is compared with DeepSpeed's own on
generated hostfiles and include/exclude strings; the host checks run against two real ssh hosts
on this machine (tests/hosts/up.sh: dthost1, dthost2 on loopback addresses, plus dthost-down
where nothing listens), and a real `deepspeed --hostfile` launch over pdsh shows that what the
doctor passes launches and what it flags fails the way it said."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, dtlab, free_port
from dtlab.doctor.diagnose import matching_interfaces
from dtlab.doctor.hostfile import MAX_SLOTS, is_loopback, load, parse, resolve, why_unsafe


# ---- the parser, against DeepSpeed's
def _ds_fetch(path):
    """DeepSpeed reading the file itself (open, readlines, its parser)."""
    from deepspeed.launcher.runner import fetch_hostfile
    try:
        return dict(fetch_hostfile(str(path)))
    except (ValueError, UnicodeDecodeError):
        return None


names = st.one_of(st.sampled_from(["w1", "w2", "node-3", "10.0.0.4", "gpu_5", "alice@w1",
                                   "bob@10.0.0.5", "fe80::1%eth0", "2001:db8::7", "::1",
                                   "localhost", "127.0.0.1"]),
                  st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=4))
seps = st.sampled_from(["\n", "\r\n", "\r", "\x0c", "\x85", "\u2028", "\x0b"])
lines = st.one_of(
    st.builds(lambda h, n, sp, tail: f"{sp}{h}{sp} slots={n}{tail}", names,
              st.one_of(st.integers(0, 16), st.sampled_from([4096, 4097, 10**9])),
              st.sampled_from(["", " ", "\t", "\u00a0"]),
              st.sampled_from(["", " # box", "  extra", "\x0cw2 slots=2"])),
    st.sampled_from(["", "   ", "# comment", "w1 slots = 4", "w1", "slots=4", "w1 slot=4",
                     "w1 slots=x", "w1 slots=\u0663"]))


@pytest.mark.deepspeed
@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(lines, seps), max_size=6))
def test_parser_accepts_and_rejects_exactly_what_deepspeed_does(file_lines):
    """Both read the same bytes from a file. Where DeepSpeed refuses, so do we; where it
    accepts, we see the same hosts and slots, or refuse only what we refuse on purpose: a name
    that is unsafe to hand to ssh, or an impossible slot count."""
    import tempfile
    pytest.importorskip("deepspeed")
    text = "".join(line + sep for line, sep in file_lines)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "hostfile"
        path.write_bytes(text.encode("utf-8"))
        ours, theirs = load(path), _ds_fetch(path)
    errors = [f.message for f in ours.findings if f.severity == "error"]
    if theirs is None:
        assert not ours.ok, text
    elif ours.ok:
        assert dict(ours.hosts) == theirs and list(ours.hosts) == list(theirs), text
    else:  # refused on purpose: unsafe for ssh, impossible slots, loopback among several hosts
        assert all("refused" in e or "more than any machine runs" in e or "is the loopback" in e
                   for e in errors), (text, errors)
        assert any(why_unsafe(h) or n > MAX_SLOTS or (is_loopback(h) and len(theirs) > 1)
                   for h, n in theirs.items()), (text, errors)


specs = st.lists(st.builds(lambda h, s, colon: h + (":" + ",".join(map(str, s))
                                                   if s or colon else ""),
                           st.sampled_from(["w1", "w2", "w9"]),
                           st.lists(st.integers(0, 4), max_size=3), st.booleans()),
                 min_size=1, max_size=3)  # "w1:" (an empty slot list) crashes DeepSpeed


@pytest.mark.deepspeed
@settings(max_examples=500, deadline=None)
@given(specs, st.booleans())
def test_include_exclude_resolve_like_deepspeed(parts, include):
    """Every filter DeepSpeed refuses (or crashes on: 'w1:' gives ValueError: invalid literal
    for int() with base 10: '', and one that leaves no slot an IndexError after the filter) we
    refuse; every one it takes resolves to the same slots."""
    pytest.importorskip("deepspeed")
    from deepspeed.launcher.runner import parse_inclusion_exclusion
    pool = {"w1": 2, "w2": 4}
    spec = "@".join(parts)
    hf = parse("w1 slots=2\nw2 slots=4\n")
    ours = resolve(hf, spec if include else "", "" if include else spec)
    ours_failed = any(f.severity == "error" for f in hf.findings)
    try:
        theirs = parse_inclusion_exclusion(pool, spec if include else "", "" if include else spec)
    except ValueError:
        theirs = None
    theirs = theirs or None  # no slot left: its runner's list(active_resources.keys())[0] fails
    assert ours_failed == (theirs is None), (spec, include, [f.message for f in hf.findings])
    if theirs is not None:
        assert {h: list(s) for h, s in ours.items()} == {h: list(s) for h, s in theirs.items()}


def test_findings_name_the_line_and_the_fix():
    hf = parse("# cluster\nw1 slots=4 # box\nw2 slots=0\nw3\nw1 slots=2\n\n-oProxyCommand=x slots=1\n",
               "hosts")
    msgs = [(f.severity, f.line, f.message) for f in hf.findings]
    assert ("warn", 2) == msgs[0][:2] and "ignores the text" in msgs[0][2]
    assert ("warn", 3) == msgs[1][:2] and "slots=0" in msgs[1][2]
    assert ("error", 4) == msgs[2][:2] and "slot count is missing" in msgs[2][2]
    assert ("error", 5) == msgs[3][:2] and "already on line 2" in msgs[3][2]
    assert ("error", 7) == msgs[4][:2] and "refused" in msgs[4][2]
    assert not parse("\n# only comments\n").ok


def test_nccl_and_gloo_interface_rules():
    names = {"lo", "eth0", "eth1", "docker0", "ib0"}
    assert matching_interfaces("NCCL_SOCKET_IFNAME", "eth", names) == {"eth0", "eth1"}
    assert matching_interfaces("NCCL_SOCKET_IFNAME", "=eth0", names) == {"eth0"}
    assert matching_interfaces("NCCL_SOCKET_IFNAME", "^docker,lo", names) == {"eth0", "eth1", "ib0"}
    assert matching_interfaces("NCCL_SOCKET_IFNAME", "=eth", names) == set()
    assert matching_interfaces("GLOO_SOCKET_IFNAME", "eth", names) == set()
    assert matching_interfaces("GLOO_SOCKET_IFNAME", "eth1", names) == {"eth1"}


def test_hostile_host_name_never_reaches_ssh(tmp_path):
    marker = tmp_path / "ssh-was-called"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh").write_text(f"#!/bin/sh\ntouch {marker}\nexit 255\n")
    (fake / "ssh").chmod(0o755)
    hf = tmp_path / "hosts"
    hf.write_text("-oProxyCommand=touch${IFS}/tmp/pwned slots=1\n")
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    p = dtlab("doctor", "--hostfile", hf, "--json", env=env)
    assert p.returncode == 1
    r = json.loads(p.stdout)
    assert any("refused" in f["message"] for f in r["findings"])
    assert not marker.exists()
    p = dtlab("doctor", "--hostfile", hf, "--master-addr", "-oProxyCommand=x", env=env)
    assert p.returncode == 2 and not marker.exists()


def test_missing_hostfile_is_an_error_here_not_silence(tmp_path):
    p = dtlab("doctor", "--hostfile", tmp_path / "nope", "--json")
    assert p.returncode == 1
    assert "Unable to find hostfile" in p.stdout


# ---- against real ssh hosts
@pytest.fixture
def hosts(ssh_hosts):
    """dthost1, dthost2 over ssh, and pdsh (conftest.ssh_hosts: brought up once a session)."""


def doctor(tmp_path, hostfile_text, *args, env=None, cwd=None, straggler=False):
    """The doctor on a hostfile; the straggler preflight (seconds of GEMM and link timing per
    host) only where a test is about it."""
    hf = tmp_path / "hostfile"
    hf.write_text(hostfile_text)
    p = dtlab("doctor", "--hostfile", hf, "--json", "--connect-timeout", "3", *args,
              *([] if straggler else ["--no-straggler"]), env=env, cwd=cwd)
    assert p.returncode in (0, 1), p.stderr
    r = json.loads(p.stdout)
    errors = [f for f in r["findings"] if f["severity"] == "error"]
    return p.returncode, r, errors


def test_good_hostfile_passes(hosts, tmp_path):
    rc, r, errors = doctor(tmp_path, "dthost1 slots=1\ndthost2 slots=1\n", "--ds-report",
                           straggler=True)
    assert rc == 0 and errors == []
    # both hosts are this machine: GEMMs timed on each, the link not (loopback), nobody named
    assert sorted(r["straggler"]["hosts"]) == ["dthost1", "dthost2"]
    assert all(h["gemm_ms"] > 0 and h["link_Mbps"] is None and h["local"]
               for h in r["straggler"]["hosts"].values()), r["straggler"]
    assert [f["message"] for f in r["findings"] if f["check"] == "straggler"] == [
        next(f["message"] for f in r["findings"] if f["check"] == "straggler"
             and f["severity"] == "ok")]
    assert set(r["hosts"]) == {"dthost1", "dthost2"}
    assert r["hosts"]["dthost1"]["deepspeed"] == r["hosts"]["dthost2"]["deepspeed"]
    checks = {f["check"] for f in r["findings"] if f["severity"] == "ok"}
    assert {"hostfile", "resolve", "ssh", "master"} <= checks
    # ds_report's op table from each host, parsed: cpu_adam can be built on the CPU
    for h in ("dthost1", "dthost2"):
        assert r["hosts"][h]["ds_report"]["cpu_adam"]["compatible"] is True


@pytest.mark.parametrize("text,args,env,check,needle", [
    ("dthost1 slots=1\nno-such-host.invalid slots=1\n", (), None, "resolve", "does not resolve"),
    ("dthost1 slots=1\ndthost-down slots=1\n", (), None, "ssh", "Connection refused"),
    ("dthost1 slots=1\ndthost2 slots 1\n", (), None, "hostfile", "is not `HOST slots=N`"),
    ("dthost1 slots=1\ndthost1 slots=1\n", (), None, "hostfile", "already on line 1"),
    ("dthost1 slots=2\ndthost2 slots=1\n", ("--include", "dthost1:0@dthost2:3"), None,
     "include/exclude", "not 3"),
    ("dthost1 slots=1\ndthost2 slots=1\n", (), {".deepspeed_env": "NCCL_SOCKET_IFNAME=nosuch"},
     "interfaces", "matches no interface"),
])
def test_each_fault_gives_its_error(hosts, tmp_path, text, args, env, check, needle):
    """(A variable the ranks must see goes into .deepspeed_env: DeepSpeed exports NCCL_* from
    this shell only with CUDA, GLOO_* never.)"""
    if env and ".deepspeed_env" in env:
        work = tmp_path / "work"
        work.mkdir()
        (work / ".deepspeed_env").write_text(env.pop(".deepspeed_env") + "\n")
        args = (*args, "--cwd", work)
    rc, r, errors = doctor(tmp_path, text, *args, "--no-ports", env=env)
    assert rc == 1
    assert any(e["check"] == check and needle in e["message"] for e in errors), errors


def test_busy_master_port(hosts, tmp_path):
    port = free_port()
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))
        s.listen(1)
        rc, r, errors = doctor(tmp_path, "dthost1 slots=1\ndthost2 slots=1\n",
                               "--master-port", port)
    assert rc == 1
    assert any(e["check"] == "master" and "already in use" in e["message"] for e in errors)


def test_broken_deepspeed_env(hosts, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n\n# comment\n")
    rc, r, errors = doctor(tmp_path, "dthost1 slots=1\n", "--cwd", work)
    assert rc == 1
    lines = sorted(e.get("line") for e in errors if e["check"] == "exports")
    assert lines == [2, 3]


def _ds_launch(hostfile, out, port):
    launcher = Path(sys.executable).with_name("deepspeed")
    return subprocess.run([str(launcher), "--hostfile", str(hostfile), "--master_port", str(port),
                           "--module", "labs.deepspeed_zero", "--config", "ds_zero1", "--steps",
                           "3", "--out", str(out), "--timeout", "30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.deepspeed
@pytest.mark.cluster
def test_what_doctor_passes_launches_across_two_hosts(main_cluster, ssh_hosts, tmp_path):
    """On the namespace cluster (two nodes with their own addresses and sshd): what the doctor
    passes, DeepSpeed's launcher runs over pdsh and ssh, one rank inside each node, equal to the
    baseline."""
    pytest.importorskip("deepspeed")
    port = free_port()
    rc, r, errors = doctor(tmp_path, "n1 slots=1\nn2 slots=1\n", "--master-port", port,
                           cwd=ROOT)
    assert rc == 0, errors
    p = _ds_launch(tmp_path / "hostfile", tmp_path / "run", port)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "n1:" in p.stdout and "n2:" in p.stdout  # pdsh prefixes each host's lines
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["ok"] is True and s["hosts"] == ["n1", "n2"]


@pytest.mark.deepspeed
def test_what_doctor_flags_fails_the_launch_the_same_way(hosts, tmp_path):
    pytest.importorskip("deepspeed")
    rc, r, errors = doctor(tmp_path, "dthost-down slots=1\ndthost1 slots=1\n")
    assert rc == 1 and any(e["check"] == "ssh" and e.get("host") == "dthost-down" for e in errors)
    p = _ds_launch(tmp_path / "hostfile", tmp_path / "run", free_port())
    assert p.returncode != 0
    assert "host=dthost-down was not reachable via ssh" in p.stdout + p.stderr


def test_names_slots_and_deadlines():
    """A newline after a name is not a safe name (a regex `$` would have allowed it); a billion
    slots is refused before any list of them is built; a remote command that never answers
    does not hang the doctor."""
    from dtlab.doctor.diagnose import _readline
    assert why_unsafe("w1\n").startswith("character 3 is U+000A")
    assert why_unsafe("good-host_1.lan") is None
    hf = parse("w1 slots=1000000000\n")
    assert not hf.ok and "more than any machine runs" in hf.findings[0].message
    r, w = os.pipe()
    with os.fdopen(r) as stream:
        t0 = __import__("time").time()
        assert _readline(stream, 0.3) is None
        assert __import__("time").time() - t0 < 2
    os.close(w)


def test_host_forms_deepspeed_and_pdsh_take_are_accepted_with_a_warning_for_filters():
    hf = parse("alice@w1 slots=1\n10.0.0.5 slots=2\nfe80::1%eth0 slots=1\n")
    assert hf.ok and list(hf.hosts) == ["alice@w1", "10.0.0.5", "fe80::1%eth0"]
    warned = [f.host for f in hf.findings if f.severity == "warn"]
    assert warned == ["alice@w1", "fe80::1%eth0"]  # --include splits at '@' and ':'
    for bad, says in [("-x@w1", "not a login name"), ("alice@-oProxy", "starts with '-'"),
                      ("w\u200b1", "U+200B ZERO WIDTH SPACE"), ("w1\u00a0", "invisible"),
                      ("w;1", "a shell would interpret it")]:
        assert says in why_unsafe(bad), (bad, why_unsafe(bad))
    assert "character 2 is U+200B" in why_unsafe("w\u200b1")
    two = parse("localhost slots=1\nw2 slots=1\n")
    assert not two.ok and "is the loopback of whichever machine reads it" in \
        two.findings[0].message
    assert parse("localhost slots=2\n").ok  # one host: the loopback is that host


def test_known_launcher_bugs_by_version():
    from dtlab.doctor.diagnose import known_bugs
    old = known_bugs((0, 14, 0), {"ssh_port": 2222})
    assert len(old) == 1 and "KeyError: 'PDSH_SSH_ARGS_APPEND'" in old[0][0]
    assert known_bugs((0, 14, 1), {"ssh_port": 2222}) == []
    assert known_bugs((0, 13, 0), {"ssh_port": None}) == []


def test_include_without_a_hostfile_names_localhost_only():
    p = dtlab("doctor", "--include", "localhost:0,1", "--json")
    r = json.loads(p.stdout)
    assert not [f for f in r["findings"] if f["severity"] == "error"], r["findings"]
    p = dtlab("doctor", "--include", "w1:0", "--json")
    r = json.loads(p.stdout)
    assert p.returncode == 1 and any("knows only 'localhost'" in f["message"]
                                     for f in r["findings"])
    p = dtlab("doctor", "--include", "localhost:", "--json")
    assert p.returncode == 1 and "empty slot list" in p.stdout


def test_gloo_loopback_prediction_follows_address_order():
    """gloo lets the higher address of a pair connect: a loopback pick hangs the job exactly
    when another host's address sorts above it."""
    from types import SimpleNamespace
    from dtlab.doctor import connectivity

    def doc_with(peer_addr):
        d = SimpleNamespace(findings=[], resolved={"a": ["127.0.0.1"], "b": [peer_addr]})
        d.add = lambda check, sev, msg, fix="", host=None: d.findings.append((sev, host, msg))
        d.probes = {"a": {"hostname": "a", "gloo": {"address": "127.0.0.1", "fallback": False,
                                                     "resolved": ["127.0.0.1"]}, "env": {}},
                    "b": {"hostname": "b", "gloo": {"address": peer_addr, "fallback": False,
                                                     "resolved": [peer_addr]}, "env": {}}}
        connectivity.check_predictions(d, {})
        return [(sev, host) for sev, host, msg in d.findings if sev in ("warn", "error")]
    assert doc_with("192.168.1.2") == [("error", "a")]
    assert doc_with("10.0.0.2") == [("warn", "a")]


def test_deepspeed_env_applies_in_the_probes(hosts, tmp_path):
    """A PYTHONPATH in .deepspeed_env is exported to every node: the probes run with it, so a
    broken torch on that path is found, on every host."""
    work = tmp_path / "work"
    (work / "stub" / "torch").mkdir(parents=True)
    (work / "stub" / "torch" / "__init__.py").write_text("raise ImportError('a stub torch')\n")
    (work / ".deepspeed_env").write_text(f"PYTHONPATH={work / 'stub'}\n")
    rc, r, errors = doctor(tmp_path, "dthost1 slots=1\ndthost2 slots=1\n", "--cwd", work,
                           "--no-ports")
    bad = [e for e in errors if e["check"] == "versions"]
    assert rc == 1 and sorted(e["host"] for e in bad) == ["dthost1", "dthost2"], errors
    assert "a stub torch" in bad[0]["message"] and "PYTHONPATH=" in bad[0]["message"]


def test_master_address_on_a_docker_bridge(hosts, tmp_path):
    rc, r, errors = doctor(tmp_path, "dthost1 slots=1\ndthost2 slots=1\n", "--master-addr",
                           "172.17.0.2", "--no-ports")
    assert rc == 1 and any("Docker's default bridge" in e["message"] for e in errors), errors


# ---- what --collective launches, without ssh hosts: every host answers as if probed, the
# master check is skipped, and no ssh can start (the launch itself is watched or faked)
def _offline_doctor(monkeypatch, tmp_path, hostfile_text, *argv, summary_hosts=None):
    """``dtlab doctor --json --collective ...`` in this process. ``summary_hosts``: the host
    names the ranks report (None: nothing is launched, and a launch fails the test). Returns
    (exit status, the JSON report, the DeepSpeed command lines with their hostfile's text)."""
    import types
    from dtlab.doctor import connectivity, diagnose

    def probe(self, host):
        self.probes[host] = {"hostname": f"{host}-box", "python": "3.11.0", "cwd_exists": True,
                             "interfaces": {}, "ipv4": [], "env": {}, "gloo": None, "shm": None,
                             "torch": "2.0.0", "cuda": None, "gpus": 0, "deepspeed": "0.19.8"}
        return True, []

    def no_ssh(self, host, remote):
        raise AssertionError(f"ssh to {host} in a test without hosts")

    launched = []

    def fake_run(argv, **kw):
        hf = argv[argv.index("--hostfile") + 1]
        launched.append((list(argv), Path(hf).read_text(), hf))
        if summary_hosts is None:
            raise AssertionError("the collective was launched")
        ranks = [{"rank": r, "host": h, "phase": "bandwidth", "error": None, "busbw_GBps": 0.5}
                 for r, h in enumerate(summary_hosts)]
        out = "DTLAB-COLLECTIVE " + json.dumps({"world": len(ranks), "ranks": ranks}) + "\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(diagnose.Doctor, "check_resolve", lambda self, h: True)
    monkeypatch.setattr(diagnose.Doctor, "probe", probe)
    monkeypatch.setattr(diagnose.Doctor, "ssh_argv", no_ssh)
    monkeypatch.setattr(diagnose.Doctor, "check_master", lambda self, first: "127.0.0.1")
    monkeypatch.setattr(connectivity, "subprocess", types.SimpleNamespace(
        run=fake_run, TimeoutExpired=subprocess.TimeoutExpired, Popen=None))
    monkeypatch.setattr(connectivity, "sessions", types.SimpleNamespace(run=fake_run))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.deepspeed_env of this machine
    hf = tmp_path / "hostfile"
    hf.write_text(hostfile_text)
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = diagnose.main(["--hostfile", str(hf), "--json", "--no-ports", "--no-straggler",
                            "--collective", "--cwd", str(tmp_path), *argv])
    return rc, json.loads(out.getvalue()), launched


HOSTILE_LINE = "-oProxyCommand=touch${IFS}%s slots=1\n"


@pytest.mark.parametrize("case", ["hostfile", "deepspeed_env", "shell_env"])
def test_collective_is_not_launched_while_an_input_error_stands(monkeypatch, tmp_path, case):
    """A refused hostfile line, or a value DeepSpeed would export for the remote shell to expand
    (from .deepspeed_env or this shell): the doctor reports it and launches nothing."""
    marker = tmp_path / "touched"
    text = "n1 slots=1\nn2 slots=1\n"
    if case == "hostfile":
        text += HOSTILE_LINE % marker
    elif case == "deepspeed_env":
        (tmp_path / ".deepspeed_env").write_text(f"NCCL_DEBUG=$(touch {marker})\n")
    else:
        monkeypatch.setenv("PYTHONDTLABTEST", f"`touch {marker}`")
    rc, r, launched = _offline_doctor(monkeypatch, tmp_path, text)
    assert rc == 1 and launched == [] and not marker.exists()
    msgs = [f["message"] for f in r["findings"] if f["check"] == "collective"]
    assert msgs == ["not launching the collective: 1 error(s) above (hostfile, include/exclude, "
                    "exports, flags)"], msgs
    assert r["collective"] == {"ok": False, "not_run": True}


def test_collective_gets_a_hostfile_the_doctor_wrote(monkeypatch, tmp_path):
    """DeepSpeed reads the validated hosts from a file of the doctor's own (comments, the
    trailing text the check warns about and all else of the user's file left out), removed
    after the run; the ranks ran where the hosts say they are."""
    rc, r, launched = _offline_doctor(monkeypatch, tmp_path, "# two\nn1 slots=1 # box\n"
                                      "n2 slots=1\n", summary_hosts=["n1-box", "n2-box"])
    assert rc == 0 and r["collective"]["ok"] is True, r["findings"]
    (argv, text, path), = launched
    assert text == "n1 slots=1\nn2 slots=1\n"
    assert path != str(tmp_path / "hostfile") and not Path(path).exists()
    assert not Path(path).parent.exists()
    ok = [f["message"] for f in r["findings"] if f["check"] == "collective"]
    assert "ran on n1-box, n2-box" in ok[0], ok


def test_collective_reports_where_the_ranks_really_ran(monkeypatch, tmp_path):
    """One active host: DeepSpeed runs the job on this machine without pdsh. Each rank reports
    its host name, and a rank that ran elsewhere than its host is an error, not a pass."""
    here = socket.gethostname()
    rc, r, launched = _offline_doctor(monkeypatch, tmp_path, "n1 slots=1\n",
                                      summary_hosts=[here])
    bad = [f for f in r["findings"] if f["check"] == "collective" and f["severity"] == "error"]
    assert rc == 1 and len(launched) == 1 and r["collective"]["ok"] is False, r["findings"]
    assert bad[0]["host"] == "n1" and f"rank(s) 0 ran on {here}, not on n1 (n1-box)" in \
        bad[0]["message"] and "--force-multi" in bad[0]["fix"], bad
    assert r["collective"]["ran_on"] == [here]


def test_excluding_every_host_or_slot_is_an_error_naming_the_flag(monkeypatch, tmp_path):
    """DeepSpeed would stop with an IndexError on an empty host list; the doctor and the
    launchers' check say which flag left nothing, and --collective launches nothing."""
    from dtlab.doctor.hostfile import check
    hf = tmp_path / "hosts"
    hf.write_text("n1 slots=2\nn2 slots=1\n")
    for spec in ("n1@n2", "n1:0,1@n2:0", "n1@n2:0"):
        problem = check(str(hf), exclude=spec)
        assert problem and problem.startswith(f"--exclude {spec!r} leaves no host"), problem
    assert check(str(hf), exclude="n1:0@n2") is None
    rc, r, launched = _offline_doctor(monkeypatch, tmp_path, "n1 slots=1\nn2 slots=1\n",
                                      "--exclude", "n1@n2")
    errors = [f for f in r["findings"] if f["severity"] == "error"]
    assert rc == 1 and launched == [] and [f["check"] for f in errors] == \
        ["include/exclude", "collective"], errors


@pytest.mark.parametrize("flag,good", [("--cwd", "/srv/run"), ("--python", "/opt/py/bin/python"),
                                       ("--master-addr", "10.0.0.1")])
@pytest.mark.parametrize("bad", [";", "$", "`", " "])
def test_values_deepspeed_writes_into_the_remote_command_are_refused(capsys, flag, good, bad):
    """DeepSpeed writes `cd <cwd>; <python> ... --master_addr=<addr>` into the command pdsh runs
    on every node, unquoted: a value with a shell character is refused, naming the flag and
    the character, before anything runs."""
    from dtlab.doctor import diagnose
    value = f"{good}{bad}id"
    assert diagnose.main([flag, value, "--hostfile", "/nonexistent/hosts"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dtlab: error: {flag} {value!r} refused") and repr(bad) in err, err
    assert len(err.splitlines()) == 1


def test_master_listener_that_never_exits_does_not_hang_the_doctor(monkeypatch, tmp_path):
    """The listener answers something else than the listener's line and then never exits (a
    login banner, then a stuck shell): its error output is read with a deadline, and the whole
    process group is killed, its children too."""
    import argparse
    import time
    from dtlab.doctor import diagnose
    pids = tmp_path / "pids"
    script = f'echo $$ > {pids}; echo "Welcome"; sleep 600 & echo $! >> {pids}; wait'
    monkeypatch.setattr(diagnose.Doctor, "ssh_argv", lambda self, h, remote: ["sh", "-c", script])
    monkeypatch.setattr(diagnose, "LISTENER_EXIT_S", 0.5)
    a = diagnose.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--master-addr", "127.0.0.1", "--connect-timeout", "1"])
    d = diagnose.Doctor(a)
    t0 = time.monotonic()
    d.check_master("n1")
    assert time.monotonic() - t0 < 15
    errors = [f.message for f in d.findings if f.severity == "error"]
    assert len(errors) == 1 and "could not test port 29500 on n1" in errors[0], errors

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (FileNotFoundError, IndexError):
            return False
    deadline = time.monotonic() + 5
    while any(alive(int(p)) for p in pids.read_text().split()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(int(p)) for p in pids.read_text().split())
