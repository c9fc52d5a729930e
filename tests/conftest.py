import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dtlab.launch import sessions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Baseline cache per test session, so no stale entry from another checkout can answer; the
    course's state (where dtlab exercise, check and incident note the learner's progress) too,
    so the suite never rewrites the real one in ~/.local/state/dtlab."""
    os.environ["DTLAB_CACHE"] = str(tmp_path_factory.mktemp("dtlab-cache"))
    os.environ["DTLAB_STATE"] = str(tmp_path_factory.mktemp("dtlab-state"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dtlab(*args, timeout=300, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real console entry point as a user would."""
    e = dict(os.environ, **(env or {}))
    # past the timeout the whole job goes (torchrun's ranks run in sessions of their own)
    return sessions.run([sys.executable, "-m", "dtlab", *map(str, args)], cwd=cwd or ROOT,
                        env=e, capture_output=True, text=True, timeout=timeout)


def run_lab(lab, nproc, out: Path, *extra, timeout=300):
    """``dtlab run LAB --nproc N --out OUT ...``; returns (completed process, summary or None)."""
    p = dtlab("run", lab, "--nproc", nproc, "--out", out, *extra, timeout=timeout)
    f = Path(out) / "summary.json"
    return p, (json.loads(f.read_text()) if f.is_file() else None)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """``shared_run(lab, nproc, *args)``: (completed process, summary, folder) of
    ``dtlab run LAB --nproc N ARGS``, run once a session for every test that reads the same run
    (a plain `ddp --nproc 2 --steps 3` is read by three test files). Readers must not change
    the folder."""
    runs = {}

    def get(lab, nproc, *args):
        key = (lab, nproc, *map(str, args))
        if key not in runs:
            out = tmp_path_factory.mktemp(f"shared-{lab}")
            p, s = run_lab(lab, nproc, out, *args)
            runs[key] = p, s, out
        return runs[key]
    return get


# What the root tests need is brought up by these session fixtures, once, when a test asks for
# it: `make test` on a fresh machine as root installs and starts it (Debian packages included)
# and stops what it started at the end; what .ci/run (or a person) brought up first is reused
# as it is and left up.

@pytest.fixture(scope="session")
def main_cluster():
    """The namespace cluster n1, n2 with Slurm (slurm/local/up.sh, which also installs slurm,
    munge, openssh-server and nftables; .ci/run brings it up). Run as root, the tests bring it
    up themselves when it is not, and stop it at the end."""
    if os.path.exists("/run/dtlab-cluster/main/cluster.json"):
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("needs the namespace cluster: sudo slurm/local/up.sh")
    p = subprocess.run([str(ROOT / "slurm/local/up.sh")], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    yield
    subprocess.run([str(ROOT / "slurm/local/down.sh")], capture_output=True, timeout=120)


def _ssh_hosts_answer() -> bool:
    if shutil.which("ssh") is None:
        return False
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "dthost1",
                           "true"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def ssh_hosts():
    """The ssh test hosts dthost1, dthost2 and pdsh (tests/hosts/up.sh, which installs
    openssh-server and pdsh; .ci/run brings them up). Run as root, the tests bring them up when
    they are not (or install pdsh when only it is missing), and stop the sshd they started."""
    answer = _ssh_hosts_answer()
    if answer and shutil.which("pdsh"):
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("needs the ssh test hosts and pdsh: sudo tests/hosts/up.sh")
    p = subprocess.run([str(ROOT / "tests/hosts/up.sh")], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    yield
    if not answer:  # an sshd that was up before is not ours to stop
        subprocess.run([str(ROOT / "tests/hosts/down.sh")], capture_output=True, timeout=60)


def chromium_or_skip(what: str) -> str:
    """Debian's chromium, or a skip that says how to get it."""
    import shutil
    path = shutil.which("chromium")
    if path is None:
        pytest.skip(f"{what} needs Debian's chromium, not installed here: apt-get install "
                    "chromium (make test and .ci/run install it when run as root)")
    return path


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); runs where a GPU is lent")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
