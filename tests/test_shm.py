"""The shared-memory all-reduce's small-message path and the hierarchical all-reduce: exact at
2-4 ranks and odd lengths, a missing rank is named within a timeout, and ranks that crash leave
nothing in /dev/shm. DDP over them: tests/test_data_parallel_labs.py (one host) and
tests/test_cluster.py (two namespace-cluster nodes)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_lab


def test_exact_at_two_to_four_ranks_and_odd_lengths(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=4", str(ROOT / "tests/shm_worker.py"), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    # 7 lengths x 3 calls: copy and in place in each group the rank is in, plus hier
    assert [r["checked"] for r in ranks] == [21 * (2 * g + 1) for g in (3, 3, 2, 1)]
    assert [r["wrong"] for r in ranks] == [[], [], [], []]
    t = ranks[0]["timeout"]
    assert t is not None and "rank 1 did not arrive within 1 s" in t["message"]
    assert 0.9 <= t["after_s"] < 10


def _ours() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("dtlab-")}


def test_a_crash_in_ddp_over_shared_memory_leaves_nothing_behind(tmp_path):
    """Rank 1 is killed (SIGKILL) in step 2 while rank 0 waits for it in the all-reduce: the
    run fails within a bounded time and /dev/shm holds nothing of it (the names were unlinked
    as soon as every rank had mapped them; the memory goes with the last process)."""
    before = _ours()
    t0 = time.monotonic()
    p, s = run_lab("ddp", 2, tmp_path, "--impl", "own", "--allreduce", "shm", "--steps", 4,
                   "--fail-at-step", 2, "--fail-rank", 1, "--no-baseline", timeout=180)
    assert p.returncode != 0 and "injected failure" in p.stdout + p.stderr
    assert time.monotonic() - t0 < 120
    assert _ours() - before == set()
    leftover = subprocess.run(["pgrep", "-f", f"labs.ddp.*{tmp_path}"], capture_output=True)
    assert leftover.stdout == b""


def test_the_docs_record_holds_only_exact_results():
    """Every row of the record docs/ quotes (communication.md, ddp.md, questions.md; that the
    pages equal it is tests/test_docs.py's check) was an exact result."""
    record = json.loads((ROOT / "docs/reference/faster-collectives.json").read_text())
    for part in ("host", "cross"):
        assert record[part]["rows"], f"{part}: the record holds no rows"
        assert all(r["ok"] for r in record[part]["rows"]), part


@pytest.mark.parametrize("dies_in", ["broadcast_object_list", "all_gather_object", "barrier"])
def test_a_peer_dying_during_set_up_leaves_no_folder(tmp_path, monkeypatch, dies_in):
    """Rank 0 of two has made the private folder when the other rank dies: the collective it
    waits in raises, and the folder (with rank 0's files) is gone all the same."""
    import types

    from dtlab.collectives import shm

    def died(*a, **k):
        raise RuntimeError("Connection closed by peer")

    fake = types.SimpleNamespace(get_rank=lambda g=None: 0, get_world_size=lambda g=None: 2,
                                 broadcast_object_list=lambda *a, **k: None,
                                 all_gather_object=lambda out, obj, group=None:
                                 out.__setitem__(slice(None), [obj] * len(out)),
                                 barrier=lambda group=None: None)
    setattr(fake, dies_in, died)
    monkeypatch.setattr(shm, "dist", fake)
    monkeypatch.setattr(shm.torch, "from_file", lambda *a, **k: torch.zeros(1))
    with pytest.raises(RuntimeError, match="closed by peer"):
        shm.SharedBuffers(16, shm_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
