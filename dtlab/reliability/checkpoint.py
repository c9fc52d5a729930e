"""Checkpoints of the shared training loop: sharded, resharded on load, committed atomically,
verified before anything is read.

Layout of ``--ckpt-dir D`` (one folder per checkpoint, named by the number of finished steps):

    D/.dtlab.lock                 held by the run writing into D (a second run is refused)
    D/step-000004/.metadata       torch.distributed.checkpoint (DCP): what every chunk holds
    D/step-000004/__0_0.distcp    rank 0's chunks of every tensor
    D/step-000004/__1_0.distcp    rank 1's chunks ...
    D/step-000004/manifest.json   size and SHA-256 of every file, the settings, the history

What is saved is a layout-free *canonical state*: every parameter under the baseline model's
name and its AdamW moments, whatever the strategy that trained them (``Strategy.
canonical_state``). Each tensor is flattened and cut into W even chunks, rank r writing chunk r
(a 1-D DTensor sharded on its only dimension), so the ranks write in parallel. On load, DCP
reads whatever pieces the new layout's chunks overlap: a checkpoint written by 2 ranks resumes
on 4, a ZeRO-3 checkpoint resumes as DDP, a TP one as DDP. The same layout gets back exactly
what it saved, so its resume is bitwise.

Writing is atomic: the ranks write into a hidden folder ``.step-000004.tmp-<token>``; rank 0
writes the manifest into it last, fsyncs, renames the folder to ``step-000004`` and fsyncs ``D``
(``commit``: a ``step-000004`` already there is first moved aside to ``.trash-step-000004-<token>``
and deleted only after the new one is in place, so a crash at any point leaves one complete
``step-000004``, which the next start puts back: ``remove_interrupted``). A folder without a manifest or whose files do not match it is an interrupted write and is never
loaded; nothing is read from a folder before its files match their SHA-256, and DCP's metadata
is unpickled with an allowlist (its tensors load with ``weights_only=True``), so no code runs from
a checkpoint. Rank 0 chooses the folder to resume from and every rank verifies it before reading;
they agree or all stop with one message.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dtlab.reliability import faults
from dtlab.errors import UsageError
from dtlab.train.layout import cpu_copy, take_part, whole_params

FORMAT = 2
STEP_DIR = re.compile(r"^step-(\d{6,})$")
TMP_DIR = re.compile(r"^\.step-(\d{6,})\.tmp-[0-9a-f]+$")
TRASH_DIR = re.compile(r"^\.trash-step-(\d{6,})-[0-9a-f]+$")
FILE_NAME = re.compile(r"^(\.metadata|__\d+_\d+\.distcp)$")  # what a manifest may name
LOCK_NAME = ".dtlab.lock"


class CheckpointError(UsageError):
    """A checkpoint folder that cannot be used for this run; the message says why and the fix."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def config_hash(identity: dict) -> str:
    """What must match to resume: the settings that determine the trajectory (model, data,
    batch, lr, seed), minus the number of steps (a run may be resumed with more steps)."""
    d = {k: v for k, v in identity.items() if k != "steps"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
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


# --------------------------------------------------------------------------- one run per folder

class FolderLock:
    """An exclusive ``flock`` on ``DIR/.dtlab.lock`` for the life of a run: a second run on the
    same folder is refused with a clear message instead of overwriting the first one's files.
    The kernel drops the lock when the process dies, so a crashed run never leaves it held."""

    def __init__(self, folder: str | Path, flag: str):
        self.folder, self.flag, self.fd = Path(folder), flag, None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{self.flag} {self.folder} is in use by another run ({holder}); "
                             f"wait for it to end or give another {self.flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


# --------------------------------------------------------------------------- verified folders

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
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        return None, "the manifest lists no files"
    for entry in files:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not FILE_NAME.match(name):
            return None, (f"the manifest names {name!r}, which is not a checkpoint file of this "
                          "folder (only .metadata and __R_N.distcp)")
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            return None, f"{name} does not match its size/SHA-256 in the manifest"
    return manifest, ""


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in root.iterdir()
                   if p.is_dir() and not p.is_symlink() and (m := STEP_DIR.match(p.name))),
                  reverse=True)


def latest(root: Path, log=None, max_step: int | None = None) -> tuple[Path, dict] | None:
    """The newest verified checkpoint under ``root`` (at most ``max_step``); folders that fail
    the check are reported through ``log`` and skipped."""
    for step, folder in _step_folders(Path(root)):
        if max_step is not None and step > max_step:
            if log is not None:
                log(f"checkpoint {folder}: skipped, past --steps {max_step}")
            continue
        manifest, why = check_folder(folder)
        if manifest is not None:
            return folder, manifest
        if log is not None:
            log(f"checkpoint {folder}: skipped, {why}")
    return None


def prune(root: Path, keep: int, committed: int) -> list[Path]:
    """After committing step ``committed``: keep it and the newest verified folders before it,
    ``keep`` in all; remove older or unverified folders, and every folder past ``committed``
    (the future of a trajectory this run left when it resumed from an older checkpoint). A
    corrupt folder never counts as kept. Returns what was removed."""
    removed, kept = [], 0
    for step, folder in _step_folders(Path(root)):
        if step > committed or kept >= keep or (step < committed and
                                                 check_folder(folder)[0] is None):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        else:
            kept += 1
    return removed


def commit(root: Path, tmp: Path, step: int, token: str, fault=None) -> Path:
    """Put the finished folder ``tmp`` in place as ``step-N``. A ``step-N`` already there (left by
    an attempt that died after committing it) is moved aside first and deleted only once the new
    one is in place and the folder synced: at every point a complete ``step-N`` exists under
    one of the three names, and ``remove_interrupted`` puts it back. ``fault(point)`` is called
    between the steps (tests crash it there)."""
    fault = fault or (lambda point: None)
    final = step_dir(root, step)
    trash = None
    if final.exists():
        trash = root / f".trash-{final.name}-{token}"
        os.replace(final, trash)
        fault("old moved aside")
    os.replace(tmp, final)  # the commit point
    fault("new in place")
    _fsync_dir(root)
    fault("folder synced")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
        fault("old deleted")
    return final


def remove_interrupted(root: Path, log=None) -> list[str]:
    """Clear what dead attempts left: hidden ``.step-*.tmp-*`` folders are writes that never
    committed, ``.trash-step-*`` folders old checkpoints a commit replaced (the run holding the
    lock is the only writer, so any present at its start are from dead attempts). A commit that
    died half-way is finished first: where ``step-N`` is missing, a complete temporary folder of
    step N is promoted to it, or else a complete ``.trash`` folder of step N is restored.
    Returns a line per folder kept (each also given to ``log``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    spare: dict[int, list[Path]] = {}
    for kind in (TMP_DIR, TRASH_DIR):  # a step's newest write first, then the folder it replaced
        for p in sorted(root.iterdir()):
            if (m := kind.match(p.name)) and p.is_dir() and not p.is_symlink():
                spare.setdefault(int(m.group(1)), []).append(p)
    notes = []
    for step, folders in spare.items():
        final = step_dir(root, step)
        for p in folders:
            if not final.exists() and check_folder(p)[0] is not None:
                os.replace(p, final)
                _fsync_dir(root)
                notes.append(f"checkpoint {final}: restored from {p.name}, left by a commit "
                             "that did not finish")
            else:
                shutil.rmtree(p, ignore_errors=True)
    for line in notes:
        if log is not None:
            log(line)
    return notes


def check_compatible(manifest: dict, folder: Path, expect: dict, steps: int) -> str | None:
    """Refuse a checkpoint of another trajectory (other model, data, batch, lr or seed) or one
    past the run's last step; return a line describing the resharding when the layout differs,
    else None."""
    if manifest.get("step", 0) > steps:
        raise CheckpointError(f"--ckpt-dir: {folder} is at step {manifest['step']}, past --steps "
                              f"{steps}; raise --steps or give a new --ckpt-dir")
    if manifest.get("config_hash") != expect["config_hash"]:
        theirs, ours = manifest.get("settings") or {}, expect.get("settings") or {}
        diffs = [f"{k} {theirs.get(k)!r} (this run: {v!r})" for k, v in ours.items()
                 if k != "steps" and theirs.get(k) != v]
        raise CheckpointError(
            f"--ckpt-dir: {folder} was written by another run: "
            + (", ".join(diffs) or "other settings (model preset, data, batch size, lr or seed)")
            + "; resume with the same settings, or give a new --ckpt-dir")
    layout = {k: manifest.get(k) for k in ("lab", "variant", "world_size", "lab_flags")}
    if layout != {k: expect.get(k) for k in layout}:
        return (f"resharding: written by {layout['lab']} [{layout['variant']}] on "
                f"{layout['world_size']} rank(s), resumed by {expect['lab']} "
                f"[{expect['variant']}] on {expect['world_size']}")
    return None


# --------------------------------------------------------------------------- canonical state

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_KEY = "adam.step"


def param_key(name: str) -> str:
    return f"model.{name}"


def moment_key(moment: str, name: str) -> str:
    return f"adam.{moment}.{name}"


def param_of(key: str) -> str | None:
    """The parameter name a canonical key belongs to (None for the step count)."""
    if key.startswith("model."):
        return key[len("model."):]
    for m in MOMENTS:
        if key.startswith(f"adam.{m}."):
            return key[len(f"adam.{m}."):]
    return None


def adam_named(named: dict[str, torch.Tensor], optimizer) -> dict[str, torch.Tensor]:
    """Parameters and their AdamW moments under canonical keys, as this rank holds them (DTensors
    gathered whole), plus the step count."""
    out, steps = {}, []
    for name, p in named.items():
        out[param_key(name)] = cpu_copy(p)
        st = optimizer.state.get(p, {})
        for m in MOMENTS:
            if m in st:
                out[moment_key(m, name)] = cpu_copy(st[m])
        if "step" in st:
            steps.append(float(st["step"]))
    out[STEP_KEY] = torch.tensor(max(steps, default=0.0))
    return out


def set_adam_state(optimizer, states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   step: float) -> None:
    """Give a torch AdamW the moments (param, exp_avg, exp_avg_sq) and step count it would have
    had, through its own ``load_state_dict`` (which puts them on each parameter's device)."""
    sd = optimizer.state_dict()
    index = {id(p): i for g_sd, g in zip(sd["param_groups"], optimizer.param_groups)
             for i, p in zip(g_sd["params"], g["params"])}
    sd["state"] = {index[id(p)]: {"step": torch.tensor(float(step), dtype=torch.float32),
                                  "exp_avg": ea, "exp_avg_sq": eas} for p, ea, eas in states}
    optimizer.load_state_dict(sd)


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``p`` is: the same DTensor placement, or a plain tensor."""
    full = full.to(dtype=p.dtype)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return full.to(p.device).reshape(p.shape)


@torch.no_grad()
def load_adam_named(named: dict[str, torch.Tensor], optimizer, full: dict[str, torch.Tensor],
                    cut=lambda name, t: t) -> None:
    """The inverse of ``adam_named``: parameters and moments from the canonical ``full``
    tensors, ``cut(name, tensor)`` taking this rank's piece where the layout shards them."""
    states = []
    for name, p in named.items():
        value = _like(p, cut(name, full[param_key(name)]))
        (p.to_local() if hasattr(p, "to_local") else p).copy_(
            value.to_local() if hasattr(value, "to_local") else value)
        if moment_key("exp_avg", name) in full:
            states.append((p, *(_like(p, cut(name, full[moment_key(m, name)]))
                                for m in MOMENTS)))
    if states:
        set_adam_state(optimizer, states, full[STEP_KEY].item())


def canonical_state(strategy) -> dict[str, torch.Tensor]:
    """Every parameter under the baseline's name, its AdamW moments and the step count, as whole
    CPU tensors on every rank, whatever the layout: what a checkpoint holds, so any layout can
    resume it. Read through the strategy's ``param_layout`` (a collective where it shards the
    model); a strategy whose optimizer state is laid out otherwise (ZeRO's flat units) gives
    its own ``canonical_state``."""
    own = getattr(strategy, "canonical_state", None)
    return own() if own is not None else layout_canonical_state(strategy)


def layout_canonical_state(strategy) -> dict[str, torch.Tensor]:
    """The canonical state read through the strategy's ``param_layout`` alone."""
    lay = strategy.param_layout()
    return whole_params(lay, strategy.gather_object, adam_named(lay.named, strategy.optimizer),
                        param_of)


def load_canonical_state(strategy, full: dict[str, torch.Tensor]) -> None:
    """The inverse of ``canonical_state``: this rank's pieces of every tensor into the model and
    the optimizer."""
    own = getattr(strategy, "load_canonical_state", None)
    return own(full) if own is not None else layout_load_canonical_state(strategy, full)


def layout_load_canonical_state(strategy, full: dict[str, torch.Tensor]) -> None:
    lay = strategy.param_layout()
    load_adam_named(lay.named, strategy.optimizer, full,
                    cut=lambda name, t: take_part(lay, name, t))


# --------------------------------------------------------------------------- DCP plumbing

class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its ``.metadata``; only the classes DCP writes there may be rebuilt. The list
    is what torch 2.13's metadata of our checkpoints refers to (flat 1-D tensors, plain or
    DTensor-sharded), listed from saved folders; each entry is checked against the object the
    name resolves to, and a dotted name (protocol 4's route through a module's attributes, e.g.
    ``io.FileIO`` from a module that imports ``io``) is never followed."""
    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # a layout from its name, e.g. "torch.strided"
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
    }

    def find_class(self, module, name):
        if "." not in name:
            if (module, name) in self.ALLOWED:
                obj = super().find_class(module, name)
                if (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)) == \
                        (module, name):
                    return obj
            elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)  # a dtype is a value, it calls nothing
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which "
                                     "DCP's metadata never holds; refusing to load it")


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def _chunk(numel: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's [lo, hi) of a flat tensor cut like ``torch.chunk``: DTensor's even sharding."""
    size = -(-numel // world) if numel else 0
    return min(rank * size, numel), min((rank + 1) * size, numel)


class _Sharding:
    """How this job's ranks cut the canonical tensors: a 1-D device mesh over a CPU (gloo)
    group, since the canonical state lives on the CPU whatever the training device."""

    def __init__(self, rt):
        self.rank, self.world = (rt.rank, rt.world_size) if rt.distributed else (0, 1)
        self.group = self.mesh = None
        if rt.distributed:
            from torch.distributed.device_mesh import DeviceMesh
            import datetime
            self.group = dist.group.WORLD if rt.backend == "gloo" else dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=rt.timeout_s))
            self.mesh = DeviceMesh.from_group(self.group, "cpu")

    def view(self, full: torch.Tensor | None, numel: int, dtype) -> torch.Tensor:
        """This rank's chunk of a flattened tensor as a DTensor (a plain tensor alone)."""
        lo, hi = _chunk(numel, self.world, self.rank)
        local = full.reshape(-1)[lo:hi].clone() if full is not None else \
            torch.zeros(hi - lo, dtype=dtype)
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Shard
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size([numel]), stride=(1,))

    def full(self, piece: torch.Tensor, numel: int) -> torch.Tensor:
        """The whole flat tensor on every rank from the ranks' chunks."""
        if self.mesh is None:
            return piece
        size = -(-numel // self.world) if numel else 0
        padded = torch.zeros(size, dtype=piece.dtype)
        padded[:piece.numel()] = piece
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[:numel]

    def broadcast(self, obj):
        if self.mesh is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        if self.mesh is None:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _sharding(strategy) -> _Sharding:
    if getattr(strategy, "_ckpt_sharding", None) is None:
        strategy._ckpt_sharding = _Sharding(strategy.rt)  # one CPU group per run, made once
    return strategy._ckpt_sharding


# --------------------------------------------------------------------------- in the loop

@dataclass
class Plan:
    """What the user asked for on the command line (see ``dtlab.reliability.faults`` for the faults)."""
    ckpt_dir: str | None = None
    ckpt_every: int = 5
    ckpt_keep: int = 2

    def due(self, finished: int, total: int) -> bool:
        return self.ckpt_dir is not None and (finished % self.ckpt_every == 0 or
                                              finished == total)


def checkpoint_identity(lab: str, variant: str, world: int, settings, flags: dict) -> dict:
    """What a checkpoint records about the run that wrote it; ``config_hash`` must match to
    resume, the rest says whether the layout changed."""
    identity = settings.identity()
    return {"lab": lab, "variant": variant, "world_size": world, "lab_flags": flags,
            "config_hash": config_hash(identity), "settings": identity}


def _identity(strategy) -> dict:
    return checkpoint_identity(strategy.lab, strategy.variant, strategy.rt.world_size,
                               strategy.settings, strategy.lab_flags)


def save(strategy, finished: int, losses, steps) -> float:
    """Every rank writes its chunks of the canonical state, then rank 0 commits; returns the
    seconds taken."""
    rt, plan, fp = strategy.rt, strategy.ckpt_plan, strategy.fault_plan
    import torch.distributed.checkpoint as dcp
    t0 = time.perf_counter()
    root = Path(plan.ckpt_dir)
    sh = _sharding(strategy)
    state = canonical_state(strategy)  # full tensors on every rank, by canonical name
    token = sh.broadcast(secrets.token_hex(6) if sh.rank == 0 else None)
    tmp = root / f".step-{finished:06d}.tmp-{token}"
    views = {k: sh.view(t, t.numel(), t.dtype) for k, t in state.items()}
    dcp.save(views, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True),
             process_group=sh.group)
    mine = sorted(p for p in tmp.iterdir() if p.name.startswith(f"__{sh.rank}_")) + \
        ([tmp / ".metadata"] if sh.rank == 0 else [])
    entries = [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in mine]
    if (fp.fail_in == "checkpoint" and fp.fail_at_step is not None and rt.rank == fp.fail_rank
            and finished > fp.fail_at_step and faults.first_attempt()):
        faults.die(rt.rank, f"--fail-in checkpoint, {tmp} written but not committed")
    everyone = sh.gather(entries)  # also: nobody commits before every rank has written
    if sh.rank == 0:
        shapes = {k: [list(t.shape), str(t.dtype).replace("torch.", "")]
                  for k, t in state.items()}
        meta = {"format": FORMAT, **_identity(strategy), "step": finished, "tensors": shapes,
                "history": {"losses": losses, "steps": steps},
                "files": [e for es in everyone for e in es], "written_at": time.time()}
        with open(tmp / "manifest.json", "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        commit(root, tmp, finished, token)
        prune(root, plan.ckpt_keep, finished)
    strategy.extra.setdefault("checkpoint", {}).setdefault("saved_steps", []).append(finished)
    return time.perf_counter() - t0


def resume(strategy, losses, steps) -> int:
    """Load the newest verified checkpoint, if any (rank 0 chooses, every rank verifies and
    loads its chunks); returns the first step still to run."""
    rt, plan = strategy.rt, strategy.ckpt_plan
    info = {"dir": plan.ckpt_dir, "every": plan.ckpt_every, "resumed_from": None,
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
    if plan.ckpt_dir is None:
        return 0
    strategy.extra["checkpoint"] = info
    root = Path(plan.ckpt_dir)
    sh = _sharding(strategy)
    if sh.rank == 0:
        remove_interrupted(root, log=rt.log)
        found = latest(root, log=rt.log)
        choice = None if found is None else found[0].name
    chosen = sh.broadcast(choice if sh.rank == 0 else None)
    if chosen is None:
        return 0
    folder = root / chosen
    manifest, why = check_folder(folder)  # every rank: it must see the same, whole folder
    verdicts = sh.gather(why if manifest is None else "")
    bad = [(r, w) for r, w in enumerate(verdicts) if w]
    if bad:
        r, w = bad[0]
        raise CheckpointError(f"--ckpt-dir: rank {r} cannot use {folder} that rank 0 chose: {w}; "
                              "every rank must see the same --ckpt-dir (a shared file system, "
                              "not a node-local path)")
    note = check_compatible(manifest, folder, _identity(strategy), strategy.settings.steps)
    import torch.distributed.checkpoint as dcp
    shapes = {k: (torch.Size(s), getattr(torch, d)) for k, (s, d) in manifest["tensors"].items()}
    views = {k: sh.view(None, s.numel(), d) for k, (s, d) in shapes.items()}
    dcp.load(views, storage_reader=_reader(folder), process_group=sh.group)
    full = {k: sh.full(v.to_local() if hasattr(v, "to_local") else v, s.numel()).reshape(s)
            for k, (s, _) in shapes.items() for v in [views[k]]}
    load_canonical_state(strategy, full)
    losses.extend(manifest["history"]["losses"])
    steps.extend(manifest["history"]["steps"])
    info["resumed_from"] = manifest["step"]
    if note:
        info["resharded"] = note
        rt.log(note)
    rt.log(f"resumed from {folder} (step {manifest['step']}, attempt {info['restart_count']})")
    return manifest["step"]
