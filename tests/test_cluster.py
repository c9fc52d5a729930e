"""The namespace cluster (dtlab cluster, docs/cluster.md): nodes that are network namespaces
with their own addresses, interfaces, host names and sshd, links shaped with tbf; up and down
leave nothing behind, the shaping is real, DDP runs across nodes through torchrun, DeepSpeed's
launcher and Slurm, and the doctor sees what differs between the nodes. Needs root; .ci/run
brings the main cluster up (slurm/local/up.sh) and the tests bring their own `tst` cluster up
and down."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, dtlab, free_port

pytestmark = pytest.mark.cluster
TST = ["--name", "tst", "--subnet", "10.79.0.0/24"]


def root_or_skip():
    if os.geteuid() != 0:
        pytest.skip("the namespace cluster needs root: sudo slurm/local/up.sh")


def traces() -> dict:
    """Everything of the `tst` cluster the machine could keep: namespaces, links, qdiscs,
    /etc/hosts lines, mounts, daemons, state."""
    def out(*argv):
        return subprocess.run(argv, capture_output=True, text=True).stdout
    return {
        "netns": [ln for ln in out("ip", "netns", "list").splitlines() if "-tst-" in ln],
        "links": [ln for ln in out("ip", "-o", "link").splitlines() if "tst" in ln],
        "qdiscs": [ln for ln in out("tc", "qdisc").splitlines() if "tst" in ln],
        "hosts": [ln for ln in open("/etc/hosts").read().splitlines() if "cluster tst" in ln],
        "mounts": [ln for ln in open("/proc/mounts").read().splitlines()
                   if "dtlab-cluster/tst" in ln],
        "sshd": [ln for ln in out("ps", "-eo", "args").splitlines()
                 if "dtlab-cluster/tst" in ln],
        "state": os.path.exists("/run/dtlab-cluster/tst"),
    }


def cluster(*args, env=None):
    return dtlab("cluster", *args, env=env, timeout=120)


def test_up_down_leave_nothing_also_after_a_crash_half_way():
    root_or_skip()
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
    p = cluster("down", "--name", "tst")
    assert p.returncode == 0, p.stderr
    assert traces() == before
    # killed while building the second node: the journal still names everything it made
    p = cluster("up", *TST, "--nodes", 3, env={"DTLAB_CLUSTER_CRASH_AT": "node2"})
    assert p.returncode != 0 and traces()["netns"]
    p = cluster("down", "--name", "tst")
    assert p.returncode == 0 and traces() == before, p.stdout


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


@pytest.fixture(scope="module")
def tst():
    """Three nodes: tst1 with eth0, tst2 and tst3 with ens5 (a mixed cluster), 200mbit links."""
    root_or_skip()
    p = cluster("up", *TST, "--nodes", 3, "--inter-node", "200mbit", "--ifnames", "eth0,ens5")
    assert p.returncode == 0, p.stdout + p.stderr
    yield
    cluster("down", "--name", "tst")


def test_shaping_is_real(tst):
    """At 200mbit the nodes exchange well below 400 Mbit/s; unshaped, well above 1 Gbit/s (a
    ratio against this machine's own veth speed, not a timing)."""
    shaped = _throughput("tst1", "tst2", "10.79.0.12")
    assert 100 < shaped < 400, shaped
    assert cluster("up", *TST, "--nodes", 3, "--inter-node", "unshaped", "--ifnames",
                   "eth0,ens5").returncode == 0
    try:
        unshaped = _throughput("tst1", "tst2", "10.79.0.12")
    finally:
        cluster("up", *TST, "--nodes", 3, "--inter-node", "200mbit", "--ifnames", "eth0,ens5")
    assert unshaped > 1000 and unshaped > 3 * shaped, (shaped, unshaped)


def _doctor(tmp_path, hosts, *args, env=None):
    hf = tmp_path / "hostfile"
    hf.write_text("".join(f"{h} slots=1\n" for h in hosts))
    p = dtlab("doctor", "--hostfile", hf, "--json", "--connect-timeout", "3",
              "--master-addr", "10.79.0.11", *args, env=env, timeout=240)
    return p, json.loads(p.stdout)


def test_doctor_sees_what_differs_between_nodes(tst, tmp_path):
    """GLOO_SOCKET_IFNAME=eth0 exists on tst1 and not on tst2 (ens5 there): the doctor says so
    for tst2 alone; with tst3's sshd stopped, tst3 is reported unreachable."""
    p, r = _doctor(tmp_path, ["tst1", "tst2"], env={"GLOO_SOCKET_IFNAME": "eth0"})
    bad = [f for f in r["findings"] if f["check"] == "interfaces" and f["severity"] == "error"]
    assert [f.get("host") for f in bad] == ["tst2"], r["findings"]
    assert "ens5" in bad[0]["message"] or "eth0" in bad[0]["message"]
    pid = int(open("/run/dtlab-cluster/tst/sshd-tst3.pid").read())
    os.kill(pid, 15)
    time.sleep(0.5)
    p, r = _doctor(tmp_path, ["tst1", "tst3"])
    ssh = [f for f in r["findings"] if f["check"] == "ssh" and f["severity"] == "error"]
    assert [f.get("host") for f in ssh] == ["tst3"], r["findings"]
    assert p.returncode == 1


# ---- real engines on the main cluster (n1, n2; slurm/local/up.sh). DeepSpeed's launcher over
# ssh across n1 and n2: tests/test_doctor.py; Slurm: tests/test_slurm.py.

def test_torchrun_across_two_nodes_equals_baseline(main_cluster, tmp_path):
    p = dtlab("run", "ddp", "--nnodes", 2, "--nproc", 1, "--steps", 4, "--out", tmp_path,
              timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is True and s["baseline"]["ok"] is True
    assert s["hosts"] == ["n1", "n2"]  # one rank in each node's namespace


def test_bad_input_is_one_line():
    root_or_skip()
    for args, says in [(("--inter-node", "fast"), "--inter-node 'fast'"),
                       (("--nodes", 0), "--nodes must be in 1..64"),
                       (("--nodes", 65), "--nodes must be in 1..64"),
                       (("--name", "x", "--subnet", "10.77.0.0/24"), "already used here"),
                       (("--name", "Bad!"), "--name 'Bad!'"),
                       (("--ifnames", "eth0,a b"), "--ifnames: 'a b'")]:
        p = cluster("up", *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dtlab: error: ") and says in lines[0]



def test_not_root_and_a_taken_name_are_refused(monkeypatch):
    from dtlab.cluster import netns
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.ClusterError, match="needs root"):
        netns.up(netns.Cluster(name="tsx", subnet="10.80.0.0/24"))
    monkeypatch.undo()
    root_or_skip()
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
