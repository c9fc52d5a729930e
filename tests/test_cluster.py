"""The namespace cluster (dtlab cluster, docs/cluster.md): nodes that are network namespaces
with their own addresses, interfaces, host names and sshd, links shaped with tbf; up and down
leave nothing behind, the shaping is real, DDP runs across nodes through torchrun, DeepSpeed's
launcher and Slurm, and the doctor sees what differs between the nodes. Needs root; .ci/run
brings the main cluster up (slurm/local/up.sh) and the tests bring their own `tst` cluster up
and down."""
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, dtlab, free_port

pytestmark = pytest.mark.cluster
TST = ["--name", "tst", "--subnet", "10.79.0.0/24"]


def root_or_skip():
    if os.geteuid() != 0:
        pytest.skip("the namespace cluster needs root: sudo slurm/local/up.sh")


@pytest.fixture(scope="module", autouse=True)
def _services(request):
    """Run as root, every test here needs what the main cluster's bring-up installs (sshd, nft)
    and pdsh (DeepSpeed's launcher in the doctor's collective job): the session fixtures bring
    both up, or reuse .ci/run's."""
    if os.geteuid() == 0:
        request.getfixturevalue("main_cluster")
        request.getfixturevalue("ssh_hosts")


def traces(name: str = "tst") -> dict:
    """Everything of cluster ``name`` the machine could keep: namespaces, links, qdiscs,
    /etc/hosts and known_hosts lines, mounts, daemons, state."""
    def out(*argv):
        return subprocess.run(argv, capture_output=True, text=True).stdout
    known = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".ssh", "known_hosts")
    return {
        "netns": [ln for ln in out("ip", "netns", "list").splitlines() if f"-{name}-" in ln],
        "links": [ln for ln in out("ip", "-o", "link").splitlines() if name in ln],
        "qdiscs": [ln for ln in out("tc", "qdisc").splitlines() if name in ln],
        "hosts": [ln for ln in open("/etc/hosts").read().splitlines()
                  if f"cluster {name}" in ln],
        "known_hosts": [ln for ln in (open(known).read().splitlines()
                                      if os.path.isfile(known) else [])
                        if ln.startswith(f"{name}1,")],
        "mounts": [ln for ln in open("/proc/mounts").read().splitlines()
                   if f"dtlab-cluster/{name}" in ln],
        "sshd": [ln for ln in out("ps", "-eo", "args").splitlines()
                 if f"dtlab-cluster/{name}" in ln],
        "state": os.path.exists(f"/run/dtlab-cluster/{name}"),
        "strays": [ln for ln in out("ps", "-eo", "args").splitlines() if STRAY in ln],
    }


# A process started inside a node that outlives its command (as a rank or an agent a launcher
# left behind): `down` must end it, or it keeps the node's namespace alive
STRAY = "sleep 86399"


def cluster(*args, env=None):
    return dtlab("cluster", *args, env=env, timeout=120)


@pytest.fixture
def taken_down():
    """``taken_down(name)``: cluster ``name`` goes down after the test however it ends (a failed
    assertion between an `up` and its `down`, or a refusal that did not happen), so no test
    leaves a cluster behind."""
    names = []
    yield names.append
    for name in names:
        cluster("down", "--name", name)


def test_up_down_leave_nothing_also_after_a_crash_half_way(taken_down):
    root_or_skip()
    taken_down("tst")
    before = traces()
    assert not before["state"], "a tst cluster is up already"
    p = cluster("up", *TST, "--nodes", 2, "--inter-node", "1gbit")
    assert p.returncode == 0, p.stdout + p.stderr
    during = traces()
    assert len(during["netns"]) == 2 and len(during["hosts"]) == 2 and during["sshd"]
    assert len(during["qdiscs"]) >= 2  # both ends of both links shaped (the nodes' ends too)
    p = cluster("up", *TST, "--nodes", 2, "--inter-node", "1gbit")  # twice: harmless
    assert p.returncode == 0 and "already up" in p.stdout
    s = json.loads(cluster("status", "--name", "tst", "--json").stdout)
    assert [n["node"] for n in s["nodes"]] == ["tst1", "tst2"] and s["rate"] == "1gbit"
    assert all(n["sshd"] and n["namespace"] for n in s["nodes"])
    # strays in both nodes, the one in tst2 deaf to SIGTERM (it takes the SIGKILL after the
    # grace)
    for node, cmd in (("tst1", STRAY), ("tst2", f"trap '' TERM; {STRAY}")):
        assert cluster("exec", "--name", "tst", node, "--", "setsid", "-f", "sh", "-c",
                       f"exec </dev/null >/dev/null 2>&1; {cmd}").returncode == 0
    assert len(traces()["strays"]) >= 2
    p = cluster("down", "--name", "tst")
    assert p.returncode == 0, p.stderr
    assert traces() == before
    # killed while building the second node: the journal still names everything it made
    p = cluster("up", *TST, "--nodes", 3, env={"DTLAB_CLUSTER_CRASH_AT": "node2"})
    assert p.returncode != 0 and traces()["netns"]
    p = cluster("down", "--name", "tst")
    assert p.returncode == 0 and traces() == before, p.stdout


# ---- a failed or interrupted `up` removes what it made (its own cluster, tsr)
TSR = dict(name="tsr", nodes=2, subnet="10.81.0.0/24")


def _late_failure(monkeypatch, netns, slurm, exc):
    """The cluster to bring up, with ``exc`` raised by its last step, after every node, daemon
    and /etc/hosts line is made: Slurm's start (with --slurm), or the nodes' ssh check."""
    if not isinstance(exc, KeyboardInterrupt):
        def slurm_up(*a, **k):
            raise exc
        monkeypatch.setattr(slurm, "up", slurm_up)
        return netns.Cluster(**TSR, slurm=True)
    real = netns._ssh_ready

    def ssh_ready(*a):
        real(*a)  # every sshd answered
        raise exc
    monkeypatch.setattr(netns, "_ssh_ready", ssh_ready)
    return netns.Cluster(**TSR)


@pytest.mark.parametrize("exc", [subprocess.TimeoutExpired(["sinfo"], 10), KeyboardInterrupt()],
                         ids=["timeout-in-slurm", "ctrl-c-in-ssh-check"])
def test_a_failed_up_removes_what_it_made(monkeypatch, taken_down, exc):
    root_or_skip()
    taken_down("tsr")
    from dtlab.cluster import manage, netns, slurm
    before = traces("tsr")
    assert not before["state"], "a tsr cluster is up already"
    c = _late_failure(monkeypatch, netns, slurm, exc)
    with pytest.raises(type(exc)):
        manage.up(c, log=lambda *a: None)
    assert traces("tsr") == before


def test_ctrl_c_half_way_through_up_removes_what_it_made(taken_down):
    """Ctrl-C as a terminal sends it, to the whole process group, while `up` builds the second
    node: one line on stderr, exit status 130, and nothing of the cluster left."""
    root_or_skip()
    taken_down("tsr")
    before = traces("tsr")
    journal = "/run/dtlab-cluster/tsr/journal"
    p = subprocess.Popen([sys.executable, "-m", "dtlab", "cluster", "up", "--name", "tsr",
                          "--subnet", TSR["subnet"]], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if os.path.isfile(journal) and "dtlab-tsr-tsr2" in open(journal).read():
            break
        time.sleep(0.01)
    assert p.poll() is None, "up ended before its second node"
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["dtlab: error: cluster up --name tsr interrupted; what "
                                        "it had made is removed"], err
    assert traces("tsr") == before


def _throughput(a: str, b: str, address: str) -> float:
    """Mbit/s from node a to node b, 1.5 s of TCP."""
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "dtlab", "cluster", "exec", "--name", "tst", b,
                            "--", sys.executable, str(ROOT / "tests/tput.py"), "srv", address,
                            str(port)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(1.0)
    subprocess.run([sys.executable, "-m", "dtlab", "cluster", "exec", "--name", "tst", a, "--",
                    sys.executable, str(ROOT / "tests/tput.py"), "cli", address, str(port),
                    "1.5"], cwd=ROOT, timeout=30, check=True)
    out, _ = srv.communicate(timeout=30)
    return float(out.strip())


# tst1 with eth0, tst2 and tst3 with ens5 (a mixed cluster), 200mbit links; tst3 a container-like
# node with Docker's default 64 MiB /dev/shm
TST_UP = [*TST, "--nodes", 3, "--ifnames", "eth0,ens5", "--shm", "tst3=64m"]


@pytest.fixture(scope="module")
def tst():
    root_or_skip()
    p = cluster("up", *TST_UP, "--inter-node", "200mbit")
    assert p.returncode == 0, p.stdout + p.stderr
    yield
    cluster("down", "--name", "tst")


def test_shaping_is_real(tst):
    """At 200mbit the nodes exchange well below 400 Mbit/s; unshaped, well above 1 Gbit/s (a
    ratio against this machine's own veth speed, not a timing)."""
    shaped = _throughput("tst1", "tst2", "10.79.0.12")
    assert 100 < shaped < 400, shaped
    assert cluster("up", *TST_UP, "--inter-node", "unshaped").returncode == 0
    try:
        unshaped = _throughput("tst1", "tst2", "10.79.0.12")
    finally:
        cluster("up", *TST_UP, "--inter-node", "200mbit")
    assert unshaped > 1000 and unshaped > 3 * shaped, (shaped, unshaped)


def _doctor(tmp_path, hosts, *args, env=None, slots=1, straggler=False):
    """The doctor on ``hosts``; the straggler preflight only where a test is about it."""
    hf = tmp_path / "hostfile"
    hf.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    p = dtlab("doctor", "--hostfile", hf, "--json", "--connect-timeout", "3",
              "--master-addr", "10.79.0.11", "--master-port", free_port(), *args,
              *([] if straggler else ["--no-straggler"]), env=env,
              timeout=300)
    assert p.returncode in (0, 1), p.stderr
    return p, json.loads(p.stdout)


def _bad(r, check):
    return [f for f in r["findings"] if f["check"] == check and f["severity"] == "error"]


COLLECTIVE = ("--collective", "--collective-timeout", "5")


@pytest.mark.deepspeed
def test_doctor_collective_passes_on_a_healthy_cluster(tst, tmp_path):
    """A real all-reduce and broadcast across tst1 and tst2, started by DeepSpeed's launcher
    over pdsh (torchrun on each node over ssh: the loopback test below); the bus bandwidth is
    measured (200mbit links: at most 25 MB/s)."""
    p, r = _doctor(tmp_path, ["tst1", "tst2"], *COLLECTIVE)
    assert p.returncode == 0, [f for f in r["findings"] if f["severity"] == "error"]
    c = r["collective"]
    assert c["ok"] is True and [x["host"] for x in c["ranks"]] == ["tst1", "tst2"]
    assert 0.001 < c["busbw_GBps"] < 0.03, c
    ports = [f for f in r["findings"] if f["check"] == "ports"]
    assert sorted(f["host"] for f in ports if f["severity"] == "ok") == ["tst1", "tst2"]


def _clear(*argv):
    subprocess.run([sys.executable, "-m", "dtlab", "cluster", *argv], capture_output=True)


@pytest.mark.deepspeed
@pytest.mark.parametrize("case", ["interface", "link", "ports"])
def test_doctor_collective_names_the_broken_node(tst, tmp_path, case):
    """Each fault is named by its node in the static check that finds it and in the collective
    job, with the cause: an interface variable naming what the node lacks, a pulled link, a
    firewall that drops new connections to the node's ephemeral ports (gloo's pair ports)."""
    work = tmp_path / "work"
    work.mkdir()
    args, culprit, check = [], "tst2", {"interface": "interfaces", "link": "ssh",
                                        "ports": "ports"}[case]
    if case == "interface":  # exported to every node by DeepSpeed; tst2 has ens5
        (work / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=eth0\n")
        args = ["--cwd", work]
    elif case == "link":
        assert cluster("link", "--name", "tst", "tst2", "down").returncode == 0
    else:  # tst1 holds rank 0: the others connect to its ephemeral ports
        culprit = "tst1"
        assert cluster("firewall", "--name", "tst", "tst1", "--block",
                       "32768-60999").returncode == 0
        args = ["--master-port", "29611"]  # outside the range: the group, not the store, fails
    try:
        p, r = _doctor(tmp_path, ["tst1", "tst2"], *COLLECTIVE, *args)
    finally:
        _clear("link", "--name", "tst", "tst2", "up")
        _clear("firewall", "--name", "tst", "tst1", "--clear")
    assert p.returncode == 1
    assert [f["host"] for f in _bad(r, check)] == [culprit], r["findings"]
    coll = _bad(r, "collective")
    assert [f["host"] for f in coll] == [culprit], (coll, r.get("collective"))
    assert r["collective"]["ok"] is False and r["collective"]["failed_hosts"] == [culprit]
    assert f"the {check} check" in coll[0]["message"], coll[0]["message"]


def test_doctor_predicts_gloo_loopback_pick_by_address_order(tst, tmp_path):
    """tst2's host name resolving to 127.0.0.1 makes gloo bind loopback there. gloo lets the
    higher address of a pair connect to the lower; every other node (10.79.0.x) is below
    127.0.0.1, so tst2 connects out and the job runs: a warning, and the job proves it."""
    assert cluster("exec", "--name", "tst", "tst2", "--", "hostname", "localhost").returncode == 0
    try:
        p, r = _doctor(tmp_path, ["tst1", "tst2"], *COLLECTIVE, "--collective-launcher",
                       "torchrun")
    finally:
        cluster("exec", "--name", "tst", "tst2", "--", "hostname", "tst2")
    warn = [f for f in r["findings"] if f["check"] == "interfaces" and f["severity"] == "warn"]
    assert [f["host"] for f in warn] == ["tst2"] and "sorts below 127.0.0.1" in warn[0]["message"]
    assert r["collective"]["ok"] is True


@pytest.mark.deepspeed
def test_doctor_flags_a_small_dev_shm_and_it_really_breaks(tst, tmp_path):
    """tst3 has Docker's 64 MiB /dev/shm. Two DeepSpeed ranks there map 2 x 66 MiB for the
    CPU shared-memory all-reduce: the doctor warns for tst3 alone, and that all-reduce really
    dies of a memory fault on tst3 while it runs on tst2."""
    p, r = _doctor(tmp_path, ["tst3"], "--force-multi", "--no-ports", slots=2)
    shm = [f for f in r["findings"] if f["check"] == "shm" and f["severity"] == "warn"]
    assert [f["host"] for f in shm] == ["tst3"] and "132 MiB for 2" in shm[0]["message"]
    p, r = _doctor(tmp_path, ["tst2"], "--force-multi", "--no-ports", slots=2)
    assert not [f for f in r["findings"] if f["check"] == "shm" and f["severity"] != "ok"]
    runs = {}
    for node in ("tst2", "tst3"):
        runs[node] = subprocess.run(
            [sys.executable, "-m", "dtlab", "cluster", "exec", "--name", "tst", node, "--",
             sys.executable, "-m", "dtlab", "bench", "comm", "--nproc", "2", "--impl",
             "deepspeed-shm", "--sizes", "1MiB", "--iters", "1", "--warmup", "1", "--json",
             str(tmp_path / f"{node}.json")], cwd=ROOT, capture_output=True, text=True,
            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert runs["tst2"].returncode == 0, runs["tst2"].stderr[-2000:]
    # a rank touching a page of its segment past the tmpfs' end: SIGBUS (exit 135) or, when the
    # op's own bookkeeping lands there first, SIGSEGV (139); both seen here
    err = runs["tst3"].stderr
    assert runs["tst3"].returncode != 0 and ("exit 135" in err or "exit 139" in err), err[-2000:]


def _cpu_limited(pid: int, share: float):
    """A cgroup whose CPU quota is ``share`` of one core (cgroup v2's cpu.max, or v1's
    cfs quota where the cpu controller is mounted on its own), with ``pid`` moved into it;
    returns the function that moves it back and removes the group."""
    v2 = "/sys/fs/cgroup/cgroup.controllers"
    if os.path.exists(v2) and "cpu" in open(v2).read().split():
        root, limit = "/sys/fs/cgroup", [("cpu.max", f"{int(share * 100000)} 100000")]
    elif os.path.isdir("/sys/fs/cgroup/cpu"):
        root = "/sys/fs/cgroup/cpu"
        limit = [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", str(int(share * 100000)))]
    else:
        pytest.skip("no cgroup cpu controller to limit a node with")
    group = os.path.join(root, "dtlab-test-straggler")
    os.makedirs(group, exist_ok=True)
    for f, v in limit:
        open(os.path.join(group, f), "w").write(v)
    open(os.path.join(group, "cgroup.procs"), "w").write(str(pid))

    def undo():
        for p in open(os.path.join(group, "cgroup.procs")).read().split():
            try:
                open(os.path.join(root, "cgroup.procs"), "w").write(p)
            except OSError:
                pass  # ended meanwhile
        os.rmdir(group)
    return undo


def _stragglers(r) -> dict:
    return {f["host"]: f["message"] for f in r["findings"]
            if f["check"] == "straggler" and f["severity"] == "warn"}


def test_doctor_names_the_straggler_and_none_on_an_untouched_cluster(tst, tmp_path):
    """The straggler preflight: nobody named on the untouched tst cluster; with tst2's link at
    a tenth (tbf 20mbit of 200mbit) and tst3's CPU at a quarter of a core (its sshd, and so
    every command ssh starts there, in a cgroup with that quota), tst2 is named for its link
    and tst3 for its GEMM, each at least 2x worse than the median of the others."""
    hosts = ["tst1", "tst2", "tst3"]
    p, r = _doctor(tmp_path, hosts, "--no-ports", straggler=True)
    assert p.returncode == 0 and _stragglers(r) == {}, r["findings"]
    assert sorted(r["straggler"]["hosts"]) == hosts and not r["straggler"]["slow_link"]
    from dtlab.cluster import netns
    c = netns.Cluster.load("tst")
    netns._shape(c, c.find("tst2"), "20mbit")
    sshd = int((c.state_dir / "sshd-tst3.pid").read_text())
    undo = _cpu_limited(sshd, 0.25)
    try:
        p, r = _doctor(tmp_path, hosts, "--no-ports", straggler=True)
    finally:
        undo()
        netns._shape(c, c.find("tst2"), "200mbit")
    named = _stragglers(r)
    assert sorted(named) == ["tst2", "tst3"], r["findings"]
    assert "link carries" in named["tst2"] and "GEMM" in named["tst3"]
    assert r["straggler"]["slow_link"] == ["tst2"] and r["straggler"]["slow_gemm"] == ["tst3"]
    gemm = {h: v["gemm_ms"] for h, v in r["straggler"]["hosts"].items()}
    assert gemm["tst3"] > 2 * max(gemm["tst1"], gemm["tst2"]), gemm


def test_link_pulled_mid_run_is_traced(tst, tmp_path):
    """One rank on tst1, one on tst2; tst2's link is pulled after step 1. The rank left reports
    rank 1 silent, and the flight records show both waiting in the same all-reduce: the
    transport failed under them, not the program."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dtlab", "run", "ddp", "--nnodes", "2",
                             "--nproc", "1", "--cluster", "tst", "--steps", "3000", "--log-every",
                             "1", "--timeout", "5", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, pulled = [], False
    stop = threading.Timer(180, proc.kill)  # a hang fails this test in 3 minutes, not 10
    stop.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if not pulled and line.startswith("step    1 "):
                assert cluster("link", "--name", "tst", "tst2", "down").returncode == 0
                pulled = True
        proc.wait(timeout=120)
    finally:
        stop.cancel()
        _clear("link", "--name", "tst", "tst2", "up")
    text = "".join(lines)
    assert pulled and proc.returncode == 3, text[-3000:]
    assert "rank 1 stopped responding" in text
    # the link goes down between ops (every rank waits in the same one) or inside one (rank 1
    # waits in an op rank 0 completed): either way the report blames the transport
    assert "so the transport under it failed" in text, text[-3000:]
    s = json.loads((out / "summary.json").read_text())
    desync = s["failure"]["desync"]
    assert s["failure"]["silent_ranks"] == [1] and desync["transport_failed"], desync
    assert not desync["mismatches"] and all(b["in_op"] for b in desync["behind"]), desync


def test_doctor_sees_what_reaches_the_nodes(tst, tmp_path):
    """GLOO_SOCKET_IFNAME set in this shell is not exported by DeepSpeed: the ranks on the nodes
    never see it, so it is a warning about exports and no interface error. With tst3's sshd
    stopped, tst3 is reported unreachable by the static checks, and the collective job names it
    without starting (a launch there would hang tst1 until the timeout)."""
    p, r = _doctor(tmp_path, ["tst1", "tst2"], "--no-ports", env={"GLOO_SOCKET_IFNAME": "eth0"})
    assert not _bad(r, "interfaces"), r["findings"]
    assert any(f["check"] == "exports" and f["severity"] == "warn" and "GLOO_SOCKET_IFNAME" in
               f["message"] for f in r["findings"])
    pid = int(open("/run/dtlab-cluster/tst/sshd-tst3.pid").read())
    os.kill(pid, 15)
    time.sleep(0.5)
    p, r = _doctor(tmp_path, ["tst1", "tst3"], *COLLECTIVE, "--collective-launcher", "torchrun")
    assert [f.get("host") for f in _bad(r, "ssh")] == ["tst3"], r["findings"]
    assert [f.get("host") for f in _bad(r, "collective")] == ["tst3"]
    assert r["collective"] == {"ok": False, "failed_hosts": ["tst3"], "not_run": True}
    assert p.returncode == 1


# ---- real engines on the main cluster (n1, n2; slurm/local/up.sh). DeepSpeed's launcher over
# ssh across n1 and n2: tests/test_doctor.py; Slurm: tests/test_slurm.py.

def test_torchrun_across_two_nodes_equals_baseline(main_cluster, tmp_path):
    """2 nodes x 2 ranks, our DDP over the hierarchical all-reduce: shared memory inside each
    node, one ring per local rank between the nodes."""
    p = dtlab("run", "ddp", "--nnodes", 2, "--nproc", 2, "--impl", "own", "--allreduce", "hier",
              "--bucket-mb", 0.02, "--steps", 4, "--out", tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is True and s["baseline"]["ok"] is True
    assert s["baseline"]["max_rel_loss_diff"] <= 1e-5
    assert s["hosts"] == ["n1", "n1", "n2", "n2"]  # two ranks in each node's namespace
    assert s["variant"] == "own-hier" and len(s["extra"]["buckets"]) > 1
    # Each rank puts its half of every bucket on a ring of 2 nodes, 2(N-1)/N = 1 times: the
    # link carries S a direction (a flat ring of 4 would put 1.5 S on it)
    grads = 4 * sum(s["extra"]["buckets"])
    halves = sum(4 * (n // 2) for n in s["extra"]["buckets"])  # local rank 0's slices
    assert s["comm"]["per_rank"] == [halves, grads - halves, halves, grads - halves]


def test_bad_input_is_one_line(taken_down):
    root_or_skip()
    taken_down("x")
    # lo's 127.0.0.1/8 takes 127.0.0.0/24 on every machine, whether the main cluster is up or not
    for args, says in [(("--inter-node", "fast"), "--inter-node 'fast'"),
                       (("--nodes", 0), "--nodes must be in 1..64"),
                       (("--nodes", 65), "--nodes must be in 1..64"),
                       (("--name", "x", "--subnet", "127.0.0.0/24"),
                        "already used here (lo has 127.0.0.1/8)"),
                       (("--name", "Bad!"), "--name 'Bad!'"),
                       (("--ifnames", "eth0,a b"), "--ifnames: 'a b'")]:
        p = cluster("up", *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dtlab: error: ") and says in lines[0]


def test_not_root_and_a_taken_name_are_refused(monkeypatch, taken_down):
    from dtlab.cluster import netns
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.ClusterError, match="needs root"):
        netns.up(netns.Cluster(name="tsx", subnet="10.80.0.0/24"))
    monkeypatch.undo()
    root_or_skip()
    taken_down("tsx")
    with open("/etc/hosts", "a") as f:  # a real host that happens to be called tsx1
        f.write("192.0.2.99 tsx1   # dtlab test: a real host\n")
    try:
        p = cluster("up", "--name", "tsx", "--subnet", "10.80.0.0/24")
        assert p.returncode == 2 and "tsx1 already resolves to 192.0.2.99" in p.stderr, p.stderr
    finally:
        lines = open("/etc/hosts").read().splitlines()
        with open("/etc/hosts", "w") as f:
            f.write("\n".join(ln for ln in lines if "dtlab test: a real host" not in ln) + "\n")
    assert not os.path.exists("/run/dtlab-cluster/tsx")
