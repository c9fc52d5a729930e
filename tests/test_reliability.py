"""Checkpoint and resume (bitwise), a killed rank under torchrun restarts, a stalled rank named
within the timeout, and checkpoint folders that must not be loaded. Real multi-process jobs."""
import json
import pickle

import pytest
import torch

from conftest import dtlab, run_lab
from dtlab.core import checkpoint as ckpt

STEPS = 6


def _ref(tmp_path, lab, nproc, *flags):
    p, s = run_lab(lab, nproc, tmp_path / "ref", "--steps", STEPS, "--no-baseline", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    return s


@pytest.mark.parametrize("lab,nproc,flags", [
    ("ddp", 2, ()),
    ("zero", 2, ("--stage", "1")),
    ("zero", 2, ("--stage", "2")),
    ("zero", 2, ("--stage", "3")),
    ("tensor_parallel", 2, ()),
    ("pipeline", 2, ()),
], ids=["ddp", "zero1", "zero2", "zero3", "tp", "pp"])
def test_resume_is_bitwise(tmp_path, lab, nproc, flags):
    """3 steps with a checkpoint, then a new job resumes and runs to 6: the same parameters, bit
    for bit, and the same losses as 6 steps in one go."""
    ref = _ref(tmp_path, lab, nproc, *flags)
    d = tmp_path / "ck"
    p, first = run_lab(lab, nproc, tmp_path / "a", "--steps", 3, "--ckpt-dir", d, "--ckpt-every",
                       3, "--no-baseline", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    manifest = json.loads((d / "step-000003" / "manifest.json").read_text())
    sharded = lab != "ddp"
    assert manifest["sharded"] is sharded
    assert [f["file"] for f in manifest["files"]] == (
        [f"rank{r:05d}.pt" for r in range(nproc)] if sharded else ["rank00000.pt"])
    p, resumed = run_lab(lab, nproc, tmp_path / "b", "--steps", STEPS, "--ckpt-dir", d,
                         "--ckpt-every", 3, "--no-baseline", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    assert resumed["extra"]["checkpoint"]["resumed_from"] == 3
    assert "resumed from" in p.stdout
    assert resumed["losses"] == ref["losses"]
    assert resumed["params_sha256"] == ref["params_sha256"]
    assert first["params_sha256"] != ref["params_sha256"]  # the digest does tell runs apart


def test_killed_rank_restarts_and_finishes_equal(tmp_path):
    ref = _ref(tmp_path, "ddp", 2)
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
    assert "step-000004/.rank00001.pt.tmp half done" in p.stderr
    assert "step-000004: skipped, no manifest.json (an interrupted write)" in p.stdout
    assert s["extra"]["checkpoint"]["resumed_from"] == 2
    assert s["params_sha256"] == ref["params_sha256"]
    assert sorted(x.name for x in (tmp_path / "ck").iterdir()) == ["step-000004", "step-000006"]


@pytest.mark.parametrize("lab,flags,op", [
    ("ddp", ("--impl", "own"), "`"),  # our ring: the blocking wait is named by its source line
    ("zero", ("--stage", "3"), "all_gather"),
    ("tensor_parallel", (), "all_reduce"),
], ids=["ddp-own", "zero3", "tp"])
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


def test_checkpoint_from_another_run_is_refused_before_launch(tmp_path):
    d = tmp_path / "ck"
    p, _ = run_lab("ddp", 2, tmp_path / "a", "--steps", 2, "--ckpt-dir", d, "--no-baseline")
    assert p.returncode == 0, p.stderr
    for args, says in [(("--nproc", 4), "world_size 2 (this run: 4)"),
                       (("--nproc", 2, "--impl", "own"), "--impl 'torch' (this run: 'own')"),
                       (("--nproc", 2, "--lr", "0.01"), "other settings")]:
        p = dtlab("run", "ddp", *args, "--steps", 4, "--ckpt-dir", d, "--out", tmp_path / "b")
        assert p.returncode == 2, p.stdout + p.stderr
        assert p.stderr.startswith(f"dtlab: error: --ckpt-dir: {d}/step-000002 was written by "
                                   "another run: ") and says in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = dtlab("run", "ddp", "--nproc", 2, "--steps", 1, "--ckpt-dir", d, "--out", tmp_path / "c")
    assert p.returncode == 2 and "is at step 2, past --steps 1" in p.stderr


def test_unsupported_lab_and_bad_fault_flags(tmp_path):
    cases = [
        (("torch_multiprocessing", "--nproc", 1, "--ckpt-dir", tmp_path),
         "--ckpt-dir: lab 'torch_multiprocessing' cannot checkpoint: its workers are started"),
        (("zero", "--nproc", 2, "--impl", "fairscale-oss", "--ckpt-dir", tmp_path),
         "--ckpt-dir works with --impl own"),
        (("ddp", "--nproc", 2, "--fail-at-step", 9, "--steps", 4), "--fail-at-step must be in 0..3"),
        (("ddp", "--nproc", 2, "--stall-at-step", 1, "--stall-rank", 2),
         "--stall-rank must be in 0..1 for 2 process(es), got 2"),
        (("ddp", "--nproc", 2, "--fail-at-step", 1, "--fail-in", "checkpoint"),
         "--fail-in checkpoint needs --ckpt-dir"),
        (("ddp", "--nproc", 2, "--ckpt-every", 0, "--ckpt-dir", tmp_path), "--ckpt-every must be >= 1"),
    ]
    for args, says in cases:
        p = dtlab("run", *args, "--out", tmp_path / "o")
        assert p.returncode == 2 and says in p.stderr, (args, p.stderr[-800:])
        assert "Traceback" not in p.stderr


# ---- the checkpoint folder rules, without processes

def _write(folder, state, step=2):
    entry = ckpt.write_shard(folder, 0, state)
    return ckpt.write_manifest(folder, {"lab": "x", "world_size": 1, "config_hash": "h",
                                        "step": step, "sharded": False}, [entry])


def test_latest_skips_incomplete_and_corrupt_folders(tmp_path):
    good = ckpt.step_dir(tmp_path, 2)
    _write(good, {"w": torch.arange(4.0)})
    no_manifest = ckpt.step_dir(tmp_path, 4)
    ckpt.write_shard(no_manifest, 0, {"w": torch.zeros(4)})
    corrupt = ckpt.step_dir(tmp_path, 6)
    _write(corrupt, {"w": torch.ones(4)}, step=6)
    with open(corrupt / "rank00000.pt", "r+b") as f:  # one flipped byte
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    said = []
    folder, manifest = ckpt.latest(tmp_path, log=said.append)
    assert folder == good and manifest["step"] == 2
    assert said == [f"checkpoint {corrupt}: skipped, rank00000.pt does not match its size/SHA-256 "
                    "in the manifest",
                    f"checkpoint {no_manifest}: skipped, no manifest.json (an interrupted write)"]
    state = ckpt.load_shard(folder, manifest, 0, torch.device("cpu"))
    assert torch.equal(state["w"], torch.arange(4.0))


def test_checkpoint_loading_runs_no_code(tmp_path):
    """weights_only: a pickled object that would run code on load is refused."""
    folder = ckpt.step_dir(tmp_path, 1)
    folder.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    (folder / "rank00000.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_shard(folder, {"sharded": False}, 0, torch.device("cpu"))


def test_prune_keeps_the_newest_complete(tmp_path):
    for step in (2, 4, 6):
        _write(ckpt.step_dir(tmp_path, step), {"w": torch.zeros(1)}, step=step)
    ckpt.write_shard(ckpt.step_dir(tmp_path, 8), 0, {"w": torch.zeros(1)})  # in progress
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006",
                                                          "step-000008"]
