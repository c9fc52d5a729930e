"""The flight recorder and the desync report (dtlab/reliability/flight.py): injected stalls and
collective mismatches in real runs are traced to the right rank and op, live (`dtlab debug hang`,
SIGUSR1) and after the fact (ring files that outlive a crashed rank). A link pulled on the
namespace cluster is in tests/test_cluster.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, dtlab
from dtlab.reliability import flight


# ---- the report, on records built by hand
def _entry(n, seq, op, nbytes, group="world", returned=True, step=0, site="labs/x.py:1"):
    return {"n": n, "seq": seq, "group": group, "op": op, "bytes": nbytes, "dtype": "float32",
            "shape": [nbytes // 4], "peer": None, "step": step, "site": site,
            "issued": 1.0, "returned": 2.0 if returned else None}


def _dump(rank, entries, blocked=None):
    return {"rank": rank, "host": "h", "pid": 1, "answered": True, "entries": entries,
            "blocked_in": blocked or {"op": None, "site": None}, "step": 0}


def test_report_names_the_rank_behind_and_the_first_mismatch():
    ok = [_entry(1, 1, "all_reduce", 400), _entry(2, 2, "all_reduce", 4)]
    behind = flight.desync_report({0: _dump(0, ok + [_entry(3, 3, "all_reduce", 400, returned=False)]),
                                   1: _dump(1, ok)}, 2)
    assert [b["rank"] for b in behind["behind"]] == [1] and not behind["mismatches"]
    assert behind["behind"][0]["waited_for"]["seq"] == 3
    mism = flight.desync_report({0: _dump(0, ok + [_entry(3, 3, "all_reduce", 400)]),
                                 1: _dump(1, ok + [_entry(3, 3, "all_reduce", 28)])}, 2)
    assert not mism["behind"] and mism["mismatches"][0]["seq"] == 3
    assert {r: o["bytes"] for r, o in mism["mismatches"][0]["ops"].items()} == {0: 400, 1: 28}
    text = "\n".join(flight.describe_report(mism))
    assert "collective mismatch at op #3 of group world" in text and "rank 1 all_reduce of 28 B" in text
    same = flight.desync_report({r: _dump(r, ok + [_entry(3, 3, "all_reduce", 400, returned=False)])
                                 for r in (0, 1)}, 2)
    assert flight.describe_report(same)[0].startswith("no rank is behind and no collective "
                                                      "differs: every rank waits in the same op")
    assert same["transport_failed"] and not behind["transport_failed"]
    assert flight.desync_report({0: _dump(0, ok)}, 2)["missing"] == [1]


def test_a_rank_stuck_inside_an_op_the_others_completed_is_a_transport_failure():
    """A link cut in the middle of an all-reduce: rank 0 got rank 1's part and went on to the
    next op; rank 1 never got rank 0's and waits inside the old one. It is behind by count, but
    the report blames the transport; a rank behind that is not inside an op (a stall) is not."""
    first = [_entry(1, 1, "all_reduce", 400)]
    r0 = first + [_entry(2, 2, "all_reduce", 4), _entry(3, 3, "all_reduce", 400, returned=False)]
    r1 = first + [_entry(2, 2, "all_reduce", 4, returned=False)]
    rep = flight.desync_report({0: _dump(0, r0), 1: _dump(1, r1)}, 2)
    assert [(b["rank"], b["in_op"]) for b in rep["behind"]] == [(1, True)]
    assert rep["transport_failed"] and "rank 1 is stuck inside all_reduce #2 of group world" in \
        flight.describe_report(rep)[0]
    stalled = flight.desync_report({0: _dump(0, r0), 1: _dump(1, first + [
        _entry(2, 2, "all_reduce", 4)], {"op": "stall", "site": "dtlab/train/loop.py:1"})}, 2)
    assert [(b["rank"], b["in_op"]) for b in stalled["behind"]] == [(1, False)]
    assert not stalled["transport_failed"]


def test_point_to_point_pairs_a_send_with_its_receive():
    """Rank 0's send #k to rank 1 is rank 1's receive #k from rank 0: one sequence per pair,
    the op names differ on purpose and only the sizes must agree."""
    pair = ["p2p", 0, 1]
    d0 = [_entry(1, 1, "send", 64, pair), _entry(2, 2, "send", 64, pair)]
    d1 = [_entry(1, 1, "recv", 64, pair)]
    rep = flight.desync_report({0: _dump(0, d0), 1: _dump(1, d1)}, 2)
    assert not rep["mismatches"] and [b["rank"] for b in rep["behind"]] == [1]
    d1.append(_entry(2, 2, "recv", 32, pair))
    rep = flight.desync_report({0: _dump(0, d0), 1: _dump(1, d1)}, 2)
    assert rep["mismatches"] and rep["mismatches"][0]["seq"] == 2


def _ring(ops, capacity=flight.CAPACITY):
    """The entries a rank's ring still holds after issuing ``ops`` ((group, op, bytes), oldest
    first): per-group sequence numbers, only the newest ``capacity`` kept."""
    seq, out = {}, []
    for n, (group, op, nbytes) in enumerate(ops, 1):
        key = json.dumps(group)
        seq[key] = seq.get(key, 0) + 1
        out.append(_entry(n, seq[key], op, nbytes, group))
    return out[-capacity:]


def test_a_wrapped_ring_is_compared_only_inside_every_ranks_window():
    """Ranks 1 and 2 issued the same 5 world ops as rank 0, then 70 between themselves: their
    rings hold none of the world ops any more. That is no rank behind: the report compares only
    what every ring still holds, and says which ops it could not compare."""
    world5 = [("world", "all_reduce", 400)] * 5
    pair = [(["p2p", 1, 2], "send", 64)] * 70
    dumps = {0: _dump(0, _ring(world5)), 1: _dump(1, _ring(world5 + pair)),
             2: _dump(2, _ring(world5 + pair))}
    rep = flight.desync_report(dumps, 3)
    assert not rep["behind"] and not rep["mismatches"]
    text = "\n".join(flight.describe_report(rep))
    assert "the rings of ranks 1 and 2 hold only ops 7-70 of group p2p 1<->2" in text, text
    assert "the rings of ranks 1 and 2 hold no op of group world" in text, text
    assert "older ops are not compared" in text and "rank 1 is behind" not in text


def test_a_desync_inside_the_windows_of_wrapped_rings_is_named():
    """All three rings wrapped, at different places: rank 2 is one world op behind, and rank 1
    issued another size at world op #120, both inside every rank's window."""
    ops = [("world", "all_reduce", 400)] * 130
    r1 = list(ops)
    r1[119] = ("world", "all_reduce", 28)
    r2 = [x for o in ops[:129] for x in (o, ([2], "all_reduce", 64))]  # and its own group's
    pending = _ring(ops)
    pending[-1]["returned"] = None  # ranks 0 and 1 wait in op #130
    rep = flight.desync_report({0: _dump(0, pending), 1: _dump(1, _ring(r1)),
                                2: _dump(2, _ring(r2))}, 3)
    assert [(b["rank"], b["issued"], b["others_issued"]) for b in rep["behind"]] == [(2, 129, 130)]
    assert rep["behind"][0]["waited_for"]["seq"] == 130
    assert rep["mismatches"][0]["seq"] == 120
    assert {r: o["bytes"] for r, o in rep["mismatches"][0]["ops"].items()} == {0: 400, 1: 28, 2: 400}
    text = "\n".join(flight.describe_report(rep))
    assert "rank 2's ring holds only ops 98-129 of group world" in text, text


def test_no_exception_when_the_op_a_rank_waits_for_left_every_ring():
    """Ranks 1 and 2 hold no world op; ranks 0's ring no longer holds world op #1 either (the
    old report looked it up and raised StopIteration). A rank that really is behind, whose next
    op has left the others' rings, is still named."""
    world = [("world", "all_reduce", 400)] * 130
    pair = [(["p2p", 1, 2], "send", 64)] * 64
    rep = flight.desync_report({0: _dump(0, _ring(world)), 1: _dump(1, _ring(world + pair)),
                                2: _dump(2, _ring(world + pair))}, 3)
    assert not rep["behind"] and not rep["mismatches"]
    flight.describe_report(rep)
    late = [("world", "all_reduce", 400)] * 100 + [(["p2p", 0, 1], "send", 8)] * 20
    rep = flight.desync_report({0: _dump(0, _ring(late)), 1: _dump(1, _ring(world * 2))}, 2)
    assert [(b["rank"], b["issued"], b["others_issued"], b["waited_for"]) for b in rep["behind"]] \
        == [(0, 100, 260, None)]
    text = "\n".join(flight.describe_report(rep))
    assert "rank 0 is behind in group world: it issued 100 op(s), the others 260" in text, text
    assert "the op after it, #101, has left the others' rings" in text, text


def test_uneven_all_to_all_is_no_mismatch():
    """An all-to-all's input is as long as what its rank sends, which routing decides (expert
    parallelism): sizes may differ, the op may not."""
    ok = [_entry(1, 1, "all_reduce", 400)]
    rep = flight.desync_report({0: _dump(0, ok + [_entry(2, 2, "all_to_all", 13696)]),
                                1: _dump(1, ok + [_entry(2, 2, "all_to_all", 11776)])}, 2)
    assert not rep["mismatches"]
    rep = flight.desync_report({0: _dump(0, ok + [_entry(2, 2, "all_to_all", 13696)]),
                                1: _dump(1, ok + [_entry(2, 2, "all_reduce", 13696)])}, 2)
    assert rep["mismatches"][0]["seq"] == 2


def test_ring_file_keeps_the_newest_entries_and_survives_a_torn_slot(tmp_path):
    rec = flight.FlightRecorder(0, 2, tmp_path)
    for i in range(flight.CAPACITY + 5):
        rec.record("all_reduce", None, [])
    path = tmp_path / "flight" / "rank0.ring"
    raw = bytearray(path.read_bytes())
    raw[flight.SLOT * 3: flight.SLOT * 3 + 10] = b"{broken   "   # a slot cut by a crash
    path.write_bytes(bytes(raw))
    header, entries = flight.read_ring(path)
    assert header["rank"] == 0 and header["world"] == 2
    ns = [e["n"] for e in entries]
    assert len(ns) == flight.CAPACITY - 1 and max(ns) == flight.CAPACITY + 5 and ns == sorted(ns)
    rec.ring.close()


# ---- real runs with injected faults
def _run(tmp_path, *args, timeout=240):
    return dtlab("run", "ddp", "--nproc", 2, "--steps", 6, "--out", tmp_path / "run",
                 "--log-every", 1, *args, timeout=timeout)


def test_mismatch_is_traced_from_the_ring_files_of_a_crashed_job(tmp_path):
    """gloo aborts the rank that receives a message of another size (SIGABRT, no Python
    left to report): the launcher's side reads both ranks' ring files and names the op of
    each at the sequence number where they differ."""
    p = _run(tmp_path, "--mismatch-at-step", 2, "--mismatch-rank", 1, "--timeout", 10)
    assert p.returncode != 0
    assert "collective mismatch at op #5 of group world" in p.stderr, p.stderr[-3000:]
    rep = json.loads((tmp_path / "run" / "flight" / "report.json").read_text())
    ops = rep["mismatches"][0]["ops"]
    assert ops["1"]["bytes"] == 28 and ops["1"]["site"].startswith("dtlab/reliability/faults.py")
    assert ops["0"]["bytes"] == 27136 * 4 and ops["0"]["step"] == ops["1"]["step"] == 2
    assert any(r.get("fatal") for r in rep["ranks"].values())  # the aborted rank's stacks


def test_debug_hang_and_sigusr1_on_a_live_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dtlab", "run", "ddp", "--nproc", "2",
                             "--steps", "6", "--impl", "own", "--out", str(out), "--stall-at-step",
                             "2", "--stall-rank", "0", "--timeout", "120"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # both ranks in step 2, rank 0 stalled
            rings = flight.rings(out) if (out / "flight").is_dir() else {}
            if len(rings) == 2 and all(h["step"] == 2 for h, _ in rings.values()):
                break
            time.sleep(0.5)
        time.sleep(2)
        p = dtlab("debug", "hang", out, "--wait", 10, timeout=60)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "rank 0 is behind in group p2p 0<->1" in p.stdout, p.stdout
        assert "rank 0 on" in p.stdout and "is blocked in stall" in p.stdout
        rep = json.loads((out / "flight" / "report.json").read_text())
        assert rep["ranks"]["1"]["answered"] is True
        # SIGUSR1: the stacks at once (faulthandler), the record from the watchdog thread
        pid = flight.rings(out)[1][0]["pid"]
        os.kill(pid, signal.SIGUSR1)
        deadline = time.time() + 10
        dump = out / "flight" / "rank1.json"
        while time.time() < deadline and json.loads(dump.read_text())["why"] != "SIGUSR1":
            time.sleep(0.2)
        assert json.loads(dump.read_text())["why"] == "SIGUSR1"
        assert 'File "' in (out / "flight" / "rank1.stacks.txt").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for header, _ in flight.rings(out).values():  # torchrun's workers: their own groups
            try:
                os.kill(header["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.time() + 20
    while time.time() < deadline and any(flight.alive(h["host"], h["pid"])
                                         for h, _ in flight.rings(out).values()):
        time.sleep(0.2)
    p = dtlab("debug", "hang", out, timeout=60)  # ended: read from the ring files, no waiting
    assert "has ended" in p.stdout and "rank 0 is behind" in p.stdout, p.stdout


def test_debug_hang_bad_input(tmp_path):
    p = dtlab("debug", "hang", tmp_path)
    assert p.returncode == 2 and "no flight/ folder" in p.stderr
    (tmp_path / "flight").mkdir()
    p = dtlab("debug", "hang", tmp_path)
    assert p.returncode == 2 and "no ring files yet" in p.stderr
    p = dtlab("debug", "hang", tmp_path, "--wait", "0")
    assert p.returncode == 2 and "--wait" in p.stderr


def test_debug_hang_fails_on_every_hang_it_finds():
    """Every rank waiting in one op is a hang, and so is a rank that does not answer; exit 0
    only when the ranks agree and all answered."""
    from dtlab.report.hang_report import verdict
    ok = [_entry(1, 1, "all_reduce", 400)]
    waiting = ok + [_entry(2, 2, "all_reduce", 400, returned=False)]
    status, says = verdict(flight.desync_report({r: _dump(r, waiting) for r in (0, 1)}, 2))
    assert status == 1 and says.startswith("a hang: every rank waits in all_reduce #2"), says
    silent = dict(_dump(1, ok), answered=False, alive=True)
    status, says = verdict(flight.desync_report({0: _dump(0, ok), 1: silent}, 2))
    assert status == 1 and "rank 1 did not answer (alive)" in says, says
    assert verdict(flight.desync_report({r: _dump(r, ok) for r in (0, 1)}, 2)) == \
        (0, "no hang found: every rank answered and the ranks agree")


def test_debug_hang_exits_1_on_ranks_that_are_alive_and_silent(tmp_path):
    """Two rings whose writer (this process) is alive and runs no watchdog: nobody answers."""
    for r in (0, 1):
        rec = flight.FlightRecorder(r, 2, tmp_path)
        rec.record("all_reduce", None, [])
        rec.ring.close()
    p = dtlab("debug", "hang", tmp_path, "--wait", "0.5", timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "a hang: every rank waits in all_reduce #1 of group world" in p.stdout, p.stdout
    assert "rank 0 did not answer (alive)" in p.stdout


def test_recorder_restores_torch_distributed():
    import torch.distributed as dist
    before = dist.all_reduce
    with flight.FlightRecorder(0, 1):
        assert dist.all_reduce is not before and dist.all_reduce.__wrapped__ is before
    assert dist.all_reduce is before
    # torch's pipeline schedules build P2POp(dist.isend, ...): it checks the op by identity
    from torch.distributed import distributed_c10d as c10d
    with flight.FlightRecorder(0, 1):
        c10d._check_op(dist.isend)  # what P2POp runs; a ValueError if it does not know the op
        assert dist.isend is c10d.isend and dist.isend.__wrapped__
    assert c10d.isend is dist.isend and not hasattr(c10d.isend, "__wrapped__")
    assert Path(flight.__file__).name == "flight.py"
