"""The sbatch scripts in slurm/ on a real Slurm cluster: nodes n1 and n2 are network namespaces
of this host, a slurmd in each, under one slurmctld; brought up by slurm/local/up.sh (.ci/run
does it; so does this module when run as root). Each job trains a lab and its run record must equal the baseline; a
failing job fails the test with the job's log."""
import json
import os
import subprocess
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slurm
JOB_TIMEOUT_S = 240


def _nodes_idle() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = dict(line.split() for line in out.splitlines() if line.strip())
    return all(states.get(n, "").rstrip("*") in ("idle", "mixed", "allocated") for n in ("n1", "n2"))


@pytest.fixture(scope="module", autouse=True)
def cluster(main_cluster):
    assert _nodes_idle()


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                         timeout=10).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def submit(script: str, nodes: int, per_node: int, lab: str, out, *lab_args, env=None):
    """sbatch, then poll scontrol (faster than sbatch --wait); returns (state, log text)."""
    log = out / "job.log"
    e = dict(os.environ, NPROC_PER_NODE=str(per_node), OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}",
                        f"--ntasks-per-node={per_node}", f"--output={log}",
                        str(ROOT / "slurm" / script), lab, "--out", str(out), *map(str, lab_args)],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    state = job_state(job)
    while state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=10)
            pytest.fail(f"job {job} still {state} after {JOB_TIMEOUT_S} s:\n" +
                        (log.read_text() if log.exists() else "(no log)"))
        time.sleep(0.5)
        state = job_state(job)
    return state, (log.read_text() if log.exists() else "")


def check_run(state, log, out, world):
    assert state == "COMPLETED", f"job ended {state}; its log:\n{log[-4000:]}"
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == world
    assert s["ok"] is True and s["baseline"]["ok"] is True, log[-2000:]
    return s


# each script on both nodes with 2 ranks a node: across nodes and inside one at once (1 node or
# 1 rank a node runs the same lines of the scripts and of slurm/common.sh; the other sbatch
# scripts below run 2 nodes x 1)
@pytest.mark.parametrize("script,nodes,per_node", [
    ("torchrun.sbatch", 2, 2), ("srun.sbatch", 2, 2)])
def test_ddp_through_slurm_equals_baseline(script, nodes, per_node, tmp_path):
    state, log = submit(script, nodes, per_node, "ddp", tmp_path, "--steps", 4)
    s = check_run(state, log, tmp_path, nodes * per_node)
    hosts = "n1" if nodes == 1 else "n1 n2"
    assert f"{nodes} node(s) [{hosts}] x {per_node} process(es), lab ddp, head n1" in log
    # the ranks really ran inside the nodes (namespaces with their own host names), node by node
    assert sorted(s["hosts"]) == sorted(hosts.split() * per_node)


def test_deepspeed_through_slurm_hostfile_and_no_ssh(tmp_path):
    pytest.importorskip("deepspeed")
    state, log = submit("deepspeed.sbatch", 2, 1, "deepspeed_zero", tmp_path, "--steps", 3,
                        "--config", "ds_zero2")
    s = check_run(state, log, tmp_path, 2)
    assert "n1 slots=1\nn2 slots=1" in log  # the hostfile written from the allocation
    assert sorted(s["hosts"]) == ["n1", "n2"]


def test_accelerate_through_slurm(tmp_path):
    pytest.importorskip("accelerate")
    state, log = submit("accelerate.sbatch", 2, 1, "accelerate_lab", tmp_path, "--steps", 3)
    s = check_run(state, log, tmp_path, 2)
    assert s["extra"]["distributed_type"].endswith("MULTI_CPU")


def test_a_failing_job_is_reported_with_its_log(tmp_path):
    state, log = submit("srun.sbatch", 1, 1, "no_such_lab", tmp_path)
    assert state == "FAILED"
    assert "first argument must be a lab" in log
