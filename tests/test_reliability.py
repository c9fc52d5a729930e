"""Checkpoint and resume (bitwise), a killed rank under torchrun restarts, a stalled rank named
within the timeout, and checkpoint folders that must not be loaded. Real multi-process jobs."""
import json
import pickle
import shutil

import pytest
import torch

from conftest import dtlab, run_lab
from dtlab.reliability import checkpoint as ckpt

STEPS = 6


def _ref(tmp_path, lab, nproc, *flags):
    p, s = run_lab(lab, nproc, tmp_path / "ref", "--steps", STEPS, "--no-baseline", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    return s


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``written(lab, nproc, *flags)``: one STEPS-step run of that lab, a checkpoint after step
    3 and after step 6, made once for the tests here that read it: the record is their reference
    trajectory (checkpointing does not change it: test_resume_is_bitwise), the step-3 folder the
    checkpoint they resume or reshard from. Tests copy the folder (`_from_step_3`), never change
    it."""
    runs = {}

    def get(lab, nproc, *flags):
        key = (lab, nproc, *flags)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"written-{lab}")
            p, s = run_lab(lab, nproc, out / "a", "--steps", STEPS, "--ckpt-dir", out / "ck",
                           "--ckpt-every", 3, "--no-baseline", *flags)
            assert p.returncode == 0, p.stdout + p.stderr
            runs[key] = out / "ck", s
        return runs[key]
    return get


def _from_step_3(ck, dest):
    """A checkpoint folder of its own holding a copy of ``ck``'s step 3 (what a job that ran 3
    steps and was stopped leaves)."""
    shutil.copytree(ck / "step-000003", dest / "step-000003")
    return dest


@pytest.mark.parametrize("lab,nproc,flags", [
    ("ddp", 2, ()),
    ("zero", 2, ("--stage", "1")),
    ("zero", 2, ("--stage", "3")),
    ("tensor_parallel", 2, ()),
    ("pipeline", 2, ()),
], ids=["ddp", "zero1", "zero3", "tp", "pp"])  # (ZeRO-2 saves and loads as ZeRO-1 does)
def test_resume_is_bitwise(tmp_path, written, lab, nproc, flags):
    """6 steps in one go, with a checkpoint after step 3; then a new job resumes from that
    checkpoint and runs to 6: the same parameters, bit for bit, and the same losses."""
    ck, ref = written(lab, nproc, *flags)
    manifest = json.loads((ck / "step-000003" / "manifest.json").read_text())
    # every rank wrote its chunks of the canonical state in parallel, DCP's metadata beside them
    assert sorted(f["file"] for f in manifest["files"]) == \
        [".metadata"] + [f"__{r}_0.distcp" for r in range(nproc)]
    assert manifest["world_size"] == nproc and manifest["lab"] == lab
    d = _from_step_3(ck, tmp_path / "ck")  # so the new job starts from step 3
    p, resumed = run_lab(lab, nproc, tmp_path / "b", "--steps", STEPS, "--ckpt-dir", d,
                         "--ckpt-every", 3, "--no-baseline", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    assert resumed["extra"]["checkpoint"]["resumed_from"] == 3
    assert "resumed from" in p.stdout
    assert resumed["losses"] == ref["losses"]
    assert resumed["params_sha256"] == ref["params_sha256"]
    # the digest does tell runs apart: the parameters after step 3 are not those after step 6
    assert manifest["history"]["losses"] == ref["losses"][:3]


def test_killed_rank_restarts_and_finishes_equal(tmp_path, written):
    _, ref = written("ddp", 2)  # the trajectory without a failure
    p, s = run_lab("ddp", 2, tmp_path / "run", "--steps", STEPS, "--ckpt-dir", tmp_path / "ck",
                   "--ckpt-every", 2, "--fail-at-step", 3, "--fail-rank", 1, "--max-restarts", 1,
                   "--no-baseline", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[rank 1] injected failure: --fail-at-step 3; SIGKILL" in p.stderr
    ck = s["extra"]["checkpoint"]
    assert ck["restart_count"] == 1 and ck["resumed_from"] == 2  # step 2 redone, nothing lost
    assert s["params_sha256"] == ref["params_sha256"] and s["losses"] == ref["losses"]


def test_kill_during_checkpoint_write_is_never_loaded(tmp_path):
    """Rank 1 dies with its step-4 shard half renamed: that folder has no manifest, so the
    restart resumes from step 2 and still ends equal."""
    ref = _ref(tmp_path, "zero", 2, "--stage", "2")
    p, s = run_lab("zero", 2, tmp_path / "run", "--stage", "2", "--steps", STEPS, "--ckpt-dir",
                   tmp_path / "ck", "--ckpt-every", 2, "--fail-at-step", 3, "--fail-in",
                   "checkpoint", "--fail-rank", 1, "--max-restarts", 1, "--no-baseline",
                   timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "/.step-000004.tmp-" in p.stderr and "written but not committed" in p.stderr
    assert s["extra"]["checkpoint"]["resumed_from"] == 2
    assert s["params_sha256"] == ref["params_sha256"]
    # the interrupted write was removed at the restart; the newest two complete ones remain
    assert sorted(x.name for x in (tmp_path / "ck").iterdir() if not x.name.startswith(".")) \
        == ["step-000004", "step-000006"]


@pytest.mark.parametrize("lab,flags,op", [
    ("ddp", ("--impl", "own"), "`"),  # our ring: the blocking wait is named by its source line
    ("zero", ("--stage", "3"), "all_gather"),  # a library collective, named by its op
], ids=["ddp-own", "zero3"])  # (tensor_parallel's all_reduce is a library collective too)
def test_stalled_rank_is_named_within_the_timeout(tmp_path, lab, flags, op):
    timeout = 4
    p, s = run_lab(lab, 2, tmp_path / "run", "--steps", STEPS, "--stall-at-step", 2,
                   "--stall-rank", 1, "--timeout", timeout, "--no-baseline", *flags, timeout=120)
    assert p.returncode != 0
    err = [line for line in p.stderr.splitlines() if line.startswith("dtlab: error:")]
    assert err and err[0].startswith("dtlab: error: rank 1 stopped responding: rank 0 gave up "
                                     f"after the {timeout} s timeout in "), p.stderr
    assert op in err[0] and "at step 2" in err[0]
    f = s["failure"]
    assert s["ok"] is False and f["silent_ranks"] == [1] and f["step"] == 2
    assert f["kind"] == "timeout" and op.strip("`") in f["op"] + f["site"]
    # detected after the timeout, within a small margin (the 1 s wait for other reports + slack)
    assert timeout <= f["last_seen"]["1"]["seconds_ago"] <= timeout + 3
    assert len(s["losses"]) == 2  # the record keeps the steps that finished
    # the flight recorder's report (tests/test_hang.py for the rest): rank 1 is behind, in stall
    desync = f["desync"]
    assert [b["rank"] for b in desync["behind"]] == [1] and desync["missing"] == []
    assert desync["ranks"]["0"]["blocked_in"]["failed"] == "timed out"
    assert "rank 1 on" in p.stderr and "is blocked in stall" in p.stderr
    if lab == "ddp":  # our ring's ops are point-to-point: the group is the pair
        assert "rank 1 is behind in group p2p 0<->1" in p.stderr, p.stderr[-3000:]


def test_checkpoint_of_another_trajectory_is_refused_before_launch(tmp_path, written):
    d = _from_step_3(written("ddp", 2)[0], tmp_path / "ck")
    p = dtlab("run", "ddp", "--nproc", 2, "--lr", "0.01", "--steps", 4, "--ckpt-dir", d,
              "--out", tmp_path / "b")
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith(f"dtlab: error: --ckpt-dir: {d}/step-000003 was written by "
                               "another run: lr 0.003 (this run: 0.01)")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = dtlab("run", "ddp", "--nproc", 2, "--steps", 2, "--ckpt-dir", d, "--out", tmp_path / "c")
    assert p.returncode == 2 and "is at step 3, past --steps 2" in p.stderr


@pytest.mark.parametrize("writer,resumed", [
    (("zero", 2, ("--stage", "3")), ("zero", 4, ("--stage", "3"))),
    (("ddp", 2, ()), ("ddp", 4, ())),
    (("zero", 4, ("--stage", "1")), ("zero", 2, ("--stage", "1"))),
    (("tensor_parallel", 2, ()), ("ddp", 2, ())),
], ids=["zero3-2to4", "ddp-2to4", "zero1-4to2", "tp2-to-ddp2"])
def test_checkpoint_reshards_to_another_layout(tmp_path, written, writer, resumed):
    """Written at one layout, resumed at another: the run continues from the saved step and ends
    within the baseline's tolerance (the same arithmetic, summed in another order)."""
    lab, nproc, flags = writer
    if nproc == 2:  # the layouts the tests above wrote already: their step 3
        d = _from_step_3(written(lab, nproc, *flags)[0], tmp_path / "ck")
    else:
        d = tmp_path / "ck"
        p, _ = run_lab(lab, nproc, tmp_path / "a", "--steps", 3, "--ckpt-dir", d,
                       "--ckpt-every", 3, "--no-baseline", *flags)
        assert p.returncode == 0, p.stdout + p.stderr
    lab, nproc, flags = resumed
    p, s = run_lab(lab, nproc, tmp_path / "b", "--steps", STEPS, "--ckpt-dir", d,
                   "--ckpt-every", 3, *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    ck = s["extra"]["checkpoint"]
    assert ck["resumed_from"] == 3 and ck["resharded"].startswith("resharding: written by ")
    assert s["baseline"]["ok"] is True, s["baseline"]


def test_unsupported_lab_and_bad_fault_flags(tmp_path):
    """A checkpoint flag the lab cannot honour stops `dtlab run` before launch with one line
    (the other checkpoint and fault flags are checked in-process in tests/test_bad_input.py)."""
    p = dtlab("run", "torch_multiprocessing", "--nproc", 1, "--ckpt-dir", tmp_path, "--out",
              tmp_path / "o")
    assert p.returncode == 2 and "--ckpt-dir: lab 'torch_multiprocessing' cannot checkpoint: " \
        "its workers are started" in p.stderr, p.stderr[-800:]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---- the checkpoint folder rules, without processes

def _write(root, step, payload=b"chunk", name="__0_0.distcp"):
    """A committed folder as save() leaves it: files, then a manifest naming their hashes."""
    folder = ckpt.step_dir(root, step)
    folder.mkdir(parents=True)
    for n, data in ((name, payload), (".metadata", b"meta")):
        (folder / n).write_bytes(data)
    files = [{"file": n, "bytes": (folder / n).stat().st_size,
              "sha256": ckpt.sha256_file(folder / n)} for n in (name, ".metadata")]
    (folder / "manifest.json").write_text(json.dumps(
        {"format": ckpt.FORMAT, "step": step, "files": files}))
    return folder


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))


def test_latest_skips_incomplete_and_corrupt_folders(tmp_path):
    good = _write(tmp_path, 2)
    no_manifest = ckpt.step_dir(tmp_path, 4)
    no_manifest.mkdir()
    corrupt = _write(tmp_path, 6)
    _flip_last_byte(corrupt / "__0_0.distcp")
    said = []
    folder, manifest = ckpt.latest(tmp_path, log=said.append)
    assert folder == good and manifest["step"] == 2
    assert said == [f"checkpoint {corrupt}: skipped, __0_0.distcp does not match its "
                    "size/SHA-256 in the manifest",
                    f"checkpoint {no_manifest}: skipped, no manifest.json (an interrupted write)"]


class _Crash(Exception):
    pass


COMMIT_POINTS = ["old moved aside", "new in place", "folder synced", "old deleted"]


@pytest.mark.parametrize("replacing", [True, False], ids=["replacing", "first"])
@pytest.mark.parametrize("point", [None, *COMMIT_POINTS])
def test_a_crash_at_each_commit_step_leaves_a_complete_checkpoint(tmp_path, point, replacing):
    """The commit of step 4 dies between two of its steps (the fault hook raises there), with
    or without an older step 4 already in place; the next start's recovery leaves exactly one
    complete step-000004, the new one (it was whole before the commit began), and no hidden
    folder."""
    if replacing:
        _write(tmp_path, 4, payload=b"old")
    new = _write(tmp_path / "w", 4, payload=b"new")
    tmp = tmp_path / ".step-000004.tmp-abc123"
    new.rename(tmp)

    def fault(at):
        if at == point:
            raise _Crash(at)
    try:
        ckpt.commit(tmp_path, tmp, 4, "abc123", fault=fault)
    except _Crash:
        pass
    if point == "old moved aside" and replacing:  # the moment with no step-000004 at all
        assert not ckpt.step_dir(tmp_path, 4).exists()
    notes = ckpt.remove_interrupted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "w"]
    folder, manifest = ckpt.latest(tmp_path)
    assert folder.name == "step-000004" and manifest["step"] == 4
    payload = (folder / "__0_0.distcp").read_bytes()
    assert payload == b"new"
    assert len(notes) == (1 if point == "old moved aside" and replacing else 0), notes


def test_recovery_restores_the_old_folder_when_the_new_one_is_incomplete(tmp_path):
    """Moved aside, but the new write is not whole (a file lost with the crash): the old step-4
    is put back, and the broken write removed."""
    old = _write(tmp_path, 4, payload=b"old")
    old.rename(tmp_path / ".trash-step-000004-abc123")
    new = _write(tmp_path / "w", 4, payload=b"new")
    (new / "__0_0.distcp").unlink()
    new.rename(tmp_path / ".step-000004.tmp-abc123")
    notes = ckpt.remove_interrupted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "w"]
    assert (tmp_path / "step-000004" / "__0_0.distcp").read_bytes() == b"old"
    assert notes == [f"checkpoint {tmp_path / 'step-000004'}: restored from "
                     ".trash-step-000004-abc123, left by a commit that did not finish"]


def test_prune_never_keeps_a_corrupt_folder_over_the_good_one(tmp_path):
    """Resumed from step 2 because step 6 is corrupt, step 4 saved, --ckpt-keep 1: step 4 stays
    (it is the one just committed, and verified); the corrupt step 6 goes, and so does the older
    good one."""
    _write(tmp_path, 2)
    _flip_last_byte(_write(tmp_path, 6) / "__0_0.distcp")
    _write(tmp_path, 4)
    removed = ckpt.prune(tmp_path, keep=1, committed=4)
    assert sorted(p.name for p in removed) == ["step-000002", "step-000006"]
    assert ckpt.latest(tmp_path)[0].name == "step-000004"


def test_prune_keeps_the_newest_verified(tmp_path):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step)
    _flip_last_byte(tmp_path / "step-000004" / ".metadata")
    ckpt.prune(tmp_path, keep=3, committed=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000006",
                                                          "step-000008"]


def test_manifest_names_only_checkpoint_files(tmp_path):
    folder = _write(tmp_path, 2)
    (tmp_path / "secret").write_bytes(b"x")
    m = json.loads((folder / "manifest.json").read_text())
    m["files"].append({"file": "../secret", "bytes": 1,
                       "sha256": ckpt.sha256_file(tmp_path / "secret")})
    (folder / "manifest.json").write_text(json.dumps(m))
    manifest, why = ckpt.check_folder(folder)
    assert manifest is None and "'../secret', which is not a checkpoint file" in why


def test_checkpoint_loading_runs_no_code(tmp_path):
    """DCP unpickles its .metadata; ours allows only the classes that file holds, so a pickled
    object that would run code is refused (the tensors load with weights_only=True)."""

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        ckpt._reader(tmp_path).read_metadata()


def _call_pickle(module, name, *args):
    """Pickle bytes that call ``module``'s ``name`` (which may be a dotted route through the
    module's attributes, as protocol 4 resolves it) with ``args``: how a hostile .metadata
    would reach a class the allowlist did not mean to allow."""
    head = pickle.dumps(args, protocol=2)
    assert head[:2] == pickle.PROTO + b"\x02" and head[-1:] == pickle.STOP
    text = lambda s: pickle.BINUNICODE + len(s.encode()).to_bytes(4, "little") + s.encode()
    return (pickle.PROTO + b"\x04" + text(module) + text(name) + pickle.STACK_GLOBAL
            + head[2:-1] + pickle.REDUCE + pickle.STOP)


def test_metadata_cannot_reach_a_file_through_a_dotted_name(tmp_path):
    """``io`` is an attribute of DCP's filesystem module: the name ``io.FileIO`` would open (and
    empty) any file the user can write. Refused before anything is called."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (tmp_path / ".metadata").write_bytes(_call_pickle(
        "torch.distributed.checkpoint.filesystem", "io.FileIO", str(victim), "w"))
    with pytest.raises(pickle.UnpicklingError, match=r"refers to torch\.distributed\.checkpoint"
                       r"\.filesystem\.io\.FileIO, which DCP's metadata never holds"):
        ckpt._reader(tmp_path).read_metadata()
    assert victim.read_text() == "keep me\n"


def test_metadata_cannot_start_a_command(tmp_path):
    """A route from an allowed module to ``subprocess.Popen`` (a class, as the old rule asked):
    refused, and the command never runs."""
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(_call_pickle(
        "torch.distributed.checkpoint.filesystem",
        "torch._strobelight.cli_function_profiler.subprocess.Popen", ["touch", str(marker)]))
    with pytest.raises(pickle.UnpicklingError, match="Popen, which DCP's metadata never holds"):
        leaked = ckpt._reader(tmp_path).read_metadata()
        leaked.wait(timeout=30)  # reached only where the pickle was obeyed: let the command end
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),  # a dotted name, even here
    ("torch.distributed.checkpoint.metadata", "dataclass"),  # imported there, not DCP's own
    ("torch.distributed.checkpoint.filesystem", "Path"),  # a class imported there, not DCP's
    ("torch", "load"),  # a module on the list for its dtypes, not for its functions
])
def test_metadata_allows_only_the_exact_classes_dcp_writes(tmp_path, module, name):
    (tmp_path / ".metadata").write_bytes(_call_pickle(module, name))
    with pytest.raises(pickle.UnpicklingError, match="never holds; refusing to load it"):
        ckpt._reader(tmp_path).read_metadata()


class _FakeSharding:
    """Two ranks seen from rank 0: rank 1 reports that the folder rank 0 chose is not whole."""
    rank, world, group = 0, 2, None

    def broadcast(self, obj):
        return obj

    def gather(self, obj):
        return [obj, "__1_0.distcp is missing"]


def test_ranks_must_agree_on_the_folder_or_all_stop(tmp_path):
    from types import SimpleNamespace
    _write(tmp_path, 2)
    strategy = SimpleNamespace(
        rt=SimpleNamespace(log=lambda *a: None), extra={}, _ckpt_sharding=_FakeSharding(),
        ckpt_plan=ckpt.Plan(str(tmp_path), 2, 2))
    with pytest.raises(ckpt.CheckpointError, match="rank 1 cannot use .*step-000002 that rank 0 "
                                                    "chose: __1_0.distcp is missing"):
        ckpt.resume(strategy, [], [])


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    lock = ckpt.FolderLock(tmp_path / "out", "--out").acquire()
    try:
        p = dtlab("run", "ddp", "--nproc", 2, "--steps", 2, "--out", tmp_path / "out")
        assert p.returncode == 2 and p.stderr.startswith(
            f"dtlab: error: --out {tmp_path / 'out'} is in use by another run (pid ")
    finally:
        lock.release()
    p = dtlab("run", "ddp", "--nproc", 2, "--steps", 2, "--out", tmp_path / "out")
    assert p.returncode == 0, p.stderr


def test_data_file_is_identified_by_its_content(tmp_path):
    """Editing a --data file changes the run's identity (the baseline cache key and what a
    checkpoint must match), even under the same path."""
    import argparse

    from dtlab.train.settings import add_common_args, settings_from_args
    f = tmp_path / "text.txt"
    f.write_text("hello world, " * 20)
    args = add_common_args(argparse.ArgumentParser()).parse_args(["--data", str(f)])
    before = settings_from_args(args).identity()["data"]
    f.write_text("hello world! " * 20)
    after = settings_from_args(args).identity()["data"]
    assert before != after and before.startswith("text:sha256=")
