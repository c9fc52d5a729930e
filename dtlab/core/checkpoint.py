"""Checkpoints of the shared training loop: atomic, sharded where the state is sharded, verified
before they are loaded.

Layout of ``--ckpt-dir D`` (one folder per checkpoint, named by the number of finished steps):

    D/step-000004/rank00000.pt     this rank's state (every rank writes one when the strategy's
    D/step-000004/rank00001.pt     state is sharded: ZeRO, tensor and pipeline parallel; only
    D/step-000004/manifest.json    rank 0 when it is replicated: DDP), then the manifest, last

Each state file is written to a temporary name, flushed to disk and renamed, so a file is either
whole or absent. Rank 0 writes ``manifest.json`` (the same way) only after every rank has renamed
its file: the manifest names every file with its size and SHA-256, the lab, variant, world size,
step, the hash of the settings that determine the trajectory, and the losses so far. A folder
without a manifest, or whose files do not match it, is an interrupted write and is never loaded:
resuming takes the newest folder that checks out. Files are loaded with ``weights_only=True``
(tensors and plain containers only; no code runs from a checkpoint).

Resuming restores exactly what determines the rest of the run (parameters and optimizer state;
the data of step k is a function of the seed and k, and the model has no dropout), so a resumed
run follows the uninterrupted run's trajectory bit for bit on the CPU in fp32.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dtlab.core import faults
from dtlab.core.errors import UsageError

FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(UsageError):
    """A checkpoint folder that cannot be used for this run; the message says why and the fix."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def shard_name(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def config_hash(identity: dict) -> str:
    """What must match to resume: the settings that determine the trajectory, minus the number of
    steps (a run may be resumed with more steps than it first had)."""
    d = {k: v for k, v in identity.items() if k != "steps"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(folder: Path, rank: int, state: dict, before_rename=None) -> dict:
    """Write one rank's state atomically; returns its manifest entry. ``before_rename`` is a test
    hook (fault injection): it runs when the bytes are on disk under the temporary name."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / shard_name(rank)
    tmp = folder / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename(tmp)
    os.replace(tmp, final)
    _fsync_dir(folder)
    return {"file": final.name, "bytes": final.stat().st_size, "sha256": _sha256(final)}


def write_manifest(folder: Path, meta: dict, files: list[dict]) -> Path:
    """The commit point: once this rename is done the checkpoint exists."""
    manifest = {"format": FORMAT, **meta, "files": files, "written_at": time.time()}
    tmp, final = folder / ".manifest.json.tmp", folder / "manifest.json"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(folder)
    return final


def check_folder(folder: Path) -> tuple[dict | None, str]:
    """(manifest, "") for a complete checkpoint, or (None, why it is not one)."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        return None, "no manifest.json (an interrupted write)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        return None, f"manifest.json unreadable ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, f"manifest.json is not a dtlab checkpoint manifest of format {FORMAT}"
    for entry in manifest.get("files", []):
        path = folder / str(entry.get("file"))
        if not path.is_file():
            return None, f"{path.name} is missing"
        if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            return None, f"{path.name} does not match its size/SHA-256 in the manifest"
    if not manifest.get("files"):
        return None, "the manifest lists no files"
    return manifest, ""


def latest(root: Path, log=None) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under ``root`` (folders that fail the check are reported
    through ``log`` and skipped)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in root.iterdir()
                    if p.is_dir() and (m := STEP_DIR.match(p.name))), reverse=True)
    for _, folder in found:
        manifest, why = check_folder(folder)
        if manifest is not None:
            return folder, manifest
        if log is not None:
            log(f"checkpoint {folder}: skipped, {why}")
    return None


def check_compatible(manifest: dict, folder: Path, expect: dict, flags: dict,
                     steps: int) -> None:
    """Refuse a checkpoint from another lab, world size, configuration or lab flags, or one
    already past the run's last step."""
    if manifest.get("step", 0) > steps:
        raise CheckpointError(f"--ckpt-dir: {folder} is at step {manifest['step']}, past --steps "
                              f"{steps}; raise --steps or give a new --ckpt-dir")
    diffs = [f"{k} {manifest.get(k)!r} (this run: {v!r})" for k, v in expect.items()
             if manifest.get(k) != v and k != "config_hash"]
    if manifest.get("config_hash") != expect.get("config_hash"):
        theirs = manifest.get("lab_flags") or {}
        flag_diffs = [f"--{k.replace('_', '-')} {theirs.get(k)!r} (this run: {v!r})"
                      for k, v in flags.items() if theirs.get(k) != v]
        diffs += flag_diffs or ["other settings (model preset, data, batch size, lr or seed)"]
    if diffs:
        raise CheckpointError(
            f"--ckpt-dir: {folder} was written by another run: " + ", ".join(diffs) +
            "; resume with the same lab, flags and --nproc, or give a new --ckpt-dir")


def load_shard(folder: Path, manifest: dict, rank: int, device: torch.device) -> dict:
    name = shard_name(rank if manifest["sharded"] else 0)
    return torch.load(folder / name, map_location=device, weights_only=True)


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints (and older interrupted ones)."""
    folders = sorted((int(m.group(1)), p) for p in Path(root).iterdir()
                     if p.is_dir() and (m := STEP_DIR.match(p.name)))
    complete = [s for s, p in folders if (p / "manifest.json").is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for s, p in folders:
        if s < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Plan:
    """What the user asked for on the command line (see ``dtlab.core.faults`` for the faults)."""
    ckpt_dir: str | None = None
    ckpt_every: int = 5
    ckpt_keep: int = 2

    def due(self, finished: int, total: int) -> bool:
        return self.ckpt_dir is not None and (finished % self.ckpt_every == 0 or
                                              finished == total)


# --------------------------------------------------------------------------- in the loop

def _identity(strategy) -> dict:
    return checkpoint_identity(strategy.lab, strategy.rt.world_size, strategy.settings,
                               strategy.lab_flags)


def checkpoint_identity(lab: str, world: int, settings, flags: dict) -> dict:
    """What a checkpoint must match to be resumed by a run (``dtlab run`` checks it before it
    starts any process; the lab checks it again on load)."""
    return {"lab": lab, "world_size": world,
            "config_hash": config_hash({**settings.identity(), "lab_flags": flags})}


def save(strategy, finished: int, losses, steps) -> float:
    """Every writer writes its shard, then rank 0 commits the manifest; returns seconds taken."""
    rt, plan, fp = strategy.rt, strategy.ckpt_plan, strategy.fault_plan
    t0 = time.perf_counter()
    folder = step_dir(Path(plan.ckpt_dir), finished)
    dying = (fp.fail_in == "checkpoint" and fp.fail_at_step is not None and rt.rank == fp.fail_rank
             and finished > fp.fail_at_step and faults.first_attempt())
    if rt.is_main:  # a manifest left from an earlier attempt must not vouch for new files
        (folder / "manifest.json").unlink(missing_ok=True)
    strategy.barrier()
    entry = None
    if strategy.checkpoint_sharded or rt.is_main:
        hook = (lambda tmp: faults.die(rt.rank, f"--fail-in checkpoint, {tmp} half done")) \
            if dying else None
        entry = write_shard(folder, rt.rank, strategy.checkpoint_state(), hook)
    if dying:
        faults.die(rt.rank, f"--fail-in checkpoint at step {finished}")
    entries = strategy.gather_object(entry)  # also: nobody commits before every shard is in
    if rt.is_main:
        meta = {**_identity(strategy), "variant": strategy.variant, "lab_flags": strategy.lab_flags,
                "step": finished, "sharded": strategy.checkpoint_sharded,
                "history": {"losses": losses, "steps": steps}}
        write_manifest(folder, meta, [e for e in entries if e is not None])
        prune(Path(plan.ckpt_dir), plan.ckpt_keep)
    strategy.extra.setdefault("checkpoint", {}).setdefault("saved_steps", []).append(finished)
    return time.perf_counter() - t0


def resume(strategy, losses, steps) -> int:
    """Load the newest complete checkpoint, if any; returns the first step still to run."""
    rt, plan = strategy.rt, strategy.ckpt_plan
    info = {"dir": plan.ckpt_dir, "every": plan.ckpt_every, "resumed_from": None,
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
    if plan.ckpt_dir is None:
        return 0
    strategy.extra["checkpoint"] = info
    found = latest(Path(plan.ckpt_dir), log=rt.log)
    if found is None:
        return 0
    folder, manifest = found
    check_compatible(manifest, folder, _identity(strategy), strategy.lab_flags,
                     strategy.settings.steps)
    strategy.load_checkpoint_state(load_shard(folder, manifest, rt.rank, rt.device))
    losses.extend(manifest["history"]["losses"])
    steps.extend(manifest["history"]["steps"])
    info["resumed_from"] = manifest["step"]
    rt.log(f"resumed from {folder} (step {manifest['step']}, attempt {info['restart_count']})")
    return manifest["step"]
