"""Incidents (dtlab incident, docs/exercises.md): for every one, `start` brings the incident
cluster up broken and prints a symptom that does not name the cause, `check` fails on the broken
state (the real job, stopped at 8 s: a broken job fails or hangs, and either is NOT FIXED), the
reference fix (what `give-up` tells the learner to do) makes `check` pass on the real job equal
to the baseline, and nothing of the cluster is left. Each start brings a fresh cluster up (about
a second here), so no incident sees another's leftovers. Needs root and the deepspeed extra."""
import json
import os
import subprocess

import pytest

from conftest import dtlab

pytestmark = [pytest.mark.cluster, pytest.mark.deepspeed]

NAMES = ["wrong-interface", "ephemeral-firewall", "slow-link", "rank-branch", "shm-full",
         "unreachable-master"]
# words of the cause a symptom must not give away
GIVEAWAYS = ["GLOO_SOCKET_IFNAME", "ens5", "nft", "firewall", "10mbit", "10 Mbit", "all_reduce",
             "rank == 0", "/dev/shm", "172.17", "docker0"]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("incidents break a namespace cluster: needs root")
    pytest.importorskip("deepspeed")
    return {"DTLAB_STATE": str(tmp_path_factory.mktemp("state"))}


def _left() -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln for ln in netns.splitlines() if "dtlab-inc-" in ln] + \
        (["/run/dtlab-cluster/inc"] if os.path.exists("/run/dtlab-cluster/inc") else [])


@pytest.mark.parametrize("name", NAMES)
def test_broken_fails_fixed_passes_nothing_left(name, state, tmp_path):
    from dtlab.cluster.netns import Cluster
    from dtlab.incidents import catalogue, runner
    work = tmp_path / name
    try:
        p = dtlab("incident", "start", name, "--dir", work, env=state, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        symptom = next(ln for ln in p.stdout.splitlines() if "symptom:" in ln)
        assert not [w for w in GIVEAWAYS if w in symptom], symptom
        assert (work / "launch.sh").is_file() and (work / "hostfile").is_file()
        broken = dtlab("incident", "check", name, "--deadline", 8, env=state, timeout=120)
        assert broken.returncode == 1, broken.stdout + broken.stderr
        assert "NOT FIXED" in broken.stdout and _left(), broken.stdout  # still up to work on
        ctx = runner.Context(Cluster.load("inc"), work)
        catalogue.INCIDENTS[name].reference_fix(ctx)
        fixed = dtlab("incident", "check", name, "--deadline", 90, env=state, timeout=200)
        assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-2000:]
        assert "trained equal to the baseline" in fixed.stdout
        assert "the cause is fixed where it lives" in fixed.stdout
        assert "Found fastest with: dtlab" in fixed.stdout
        assert _left() == []
        s = json.loads((work / "run" / "summary.json").read_text())
        assert sorted(s["hosts"]) == sorted(catalogue.INCIDENTS[name].hosts)
        listed = dtlab("incident", "list", env=state)
        rows = [ln for ln in listed.stdout.splitlines() if ln.split()[:1] == [name]]
        assert len(rows) == 1 and " fixed (" in rows[0], listed.stdout
    finally:
        dtlab("cluster", "down", "--name", "inc")


def test_an_op_that_does_not_build_stops_start_with_its_reason(tmp_path):
    """start builds DeepSpeed's shm_comm op before any job runs (a job stopped by a deadline
    half-way through that build would leave torch's lock behind); when it cannot be built, start
    says why in one line."""
    from dtlab.incidents import runner
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'building...' >&2\necho 'error: g++: not found' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    with pytest.raises(runner.IncidentError, match=r"does not build here .*g\+\+: not found"):
        runner._ops_built(str(fake), log=lambda *a, **k: None)
