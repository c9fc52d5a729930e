"""The course: the exercises in the order they are best done, each with its lab, its docs page and
about how long it takes, and where the learner stands (``dtlab exercise list``).

How it knows where the learner's files are: ``dtlab exercise NAME --dest DIR`` notes the file it
wrote, and ``dtlab check NAME --impl FILE`` notes the file it graded, its SHA-256 and the verdict,
in one small JSON file: ``$DTLAB_STATE/exercises.json`` (default
``$XDG_STATE_HOME/dtlab``, else ``~/.local/state/dtlab``). ``list`` reads it back and looks at
each file again: a file changed since its check is shown as changed, not as passed; nothing is
run. Standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Lesson:
    exercise: str
    lab: str
    page: str
    minutes: int
    teaches: str


COURSE = (
    Lesson("dataparallel", "dataparallel", "dataparallel.md", 30,
           "one process, R replicas: scatter, replicate, gather, gradients summed on the master"),
    Lesson("shm_averaging", "torch_multiprocessing", "multiprocessing.md", 25,
           "workers meeting in shared memory: a row each, a barrier, then the average"),
    Lesson("ring_allreduce", "ring_allreduce", "ring-allreduce.md", 30,
           "point-to-point sends: a reduce-scatter then an all-gather, 2(W-1)/W of the data"),
    Lesson("ddp_buckets", "ddp", "ddp.md", 45,
           "gradient hooks, buckets and asynchronous all-reduces hidden behind backward"),
    Lesson("loss_scaler", "amp", "amp.md", 20, "dynamic loss scaling: skip, back off, grow"),
    Lesson("zero1", "zero", "zero.md", 40, "an optimizer whose state is sharded over the ranks"),
    Lesson("zero2", "zero", "zero.md", 35,
           "gradients reduce-scattered as backward makes them: a rank keeps its shard only"),
    Lesson("zero3", "zero", "zero.md", 45,
           "parameters gathered by hooks just before a layer runs, freed right after"),
    Lesson("tensor_parallel", "tensor_parallel", "tensor-parallel.md", 40,
           "column- and row-parallel layers with one all-reduce between them"),
    Lesson("gpipe", "pipeline", "pipeline.md", 20, "a pipeline schedule and its bubble"),
    Lesson("1f1b", "pipeline", "pipeline.md", 30, "one forward, one backward: fewer activations alive"),
    Lesson("interleaved_1f1b", "pipeline", "pipeline.md", 35,
           "V model chunks a stage: a V times smaller bubble for V times the messages"),
    Lesson("zero_bubble", "pipeline", "pipeline.md", 30,
           "the backward split into B and W, the W's filling the cool-down"),
    Lesson("sequence_parallel", "tensor_parallel", "sequence-parallel.md", 35,
           "an all-gather whose backward is a reduce-scatter, and its conjugate"),
    Lesson("expert_dispatch", "expert_parallel", "expert-parallel.md", 40,
           "tokens to their experts' ranks and back with uneven all-to-alls"),
    Lesson("ring_attention", "context_parallel", "context-parallel.md", 40,
           "attention over key blocks merged with the online softmax"),
    Lesson("rank_grid", "parallel3d", "3d-parallel.md", 25,
           "ranks as (dp, pp, tp) coordinates and the groups they form"),
    Lesson("checkpoint_reshard", "ddp", "reliability.md", 25,
           "a checkpoint cut into W even chunks, read back for another world size"),
)
BY_EXERCISE = {x.exercise: x for x in COURSE}


def state_file() -> Path:
    root = os.environ.get("DTLAB_STATE") or Path(
        os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "dtlab"
    return Path(root) / "exercises.json"


def _read() -> dict:
    try:
        data = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".exercises.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def note_written(name: str, path: Path) -> None:
    data = _read()
    data[name] = {"file": str(Path(path).resolve()), "written": time.strftime("%Y-%m-%d %H:%M")}
    _write(data)


def note_checked(name: str, path: Path, passed: bool) -> None:
    data = _read()
    entry = data.get(name) if isinstance(data.get(name), dict) else {}
    entry.update(file=str(Path(path).resolve()), sha256=_sha256(Path(path)), passed=passed,
                 checked=time.strftime("%Y-%m-%d %H:%M"))
    data[name] = entry
    _write(data)


def status(entry: dict | None) -> str:
    """What the learner's file of one exercise is at now."""
    if not entry or "file" not in entry:
        return "not started"
    path = Path(entry["file"])
    if not path.is_file():
        return "file gone"
    if "passed" not in entry:
        return "written, not checked yet"
    if _sha256(path) != entry.get("sha256"):
        return "changed since its last check"
    return f"{'passes' if entry['passed'] else 'fails'} (checked {entry.get('checked', '?')})"


def rows(names) -> list[dict]:
    """One row an exercise, the course's order first, then any exercise not in it."""
    data = _read()
    order = [x.exercise for x in COURSE if x.exercise in names] + \
        [n for n in names if n not in BY_EXERCISE]
    out = []
    for i, name in enumerate(order, 1):
        lesson = BY_EXERCISE.get(name)
        entry = data.get(name) if isinstance(data.get(name), dict) else None
        out.append({"n": i, "exercise": name, "lab": lesson.lab if lesson else "-",
                    "page": f"docs/{lesson.page}" if lesson else "-",
                    "minutes": lesson.minutes if lesson else None,
                    "file": entry.get("file") if entry else None, "status": status(entry)})
    return out


def note_incident(name: str, outcome: str, folder: str) -> None:
    """An incident started, checked, fixed or given up (dtlab incident)."""
    data = _read()
    incidents = data.get("incidents") if isinstance(data.get("incidents"), dict) else {}
    entry = incidents.get(name) if isinstance(incidents.get(name), dict) else {}
    if outcome == "fixed" or entry.get("outcome") != "fixed":  # a fix stays a fix
        entry.update(outcome=outcome, folder=folder, when=time.strftime("%Y-%m-%d %H:%M"))
    incidents[name] = entry
    data["incidents"] = incidents
    _write(data)


# The incidents (dtlab incident, dtlab/incidents/): a broken cluster to repair. ``lab``: the lab
# the incident's job runs; ``page``: where the tools that find it are explained.
INCIDENTS = (
    Lesson("wrong-interface", "deepspeed_zero", "doctor.md", 15,
           "what DeepSpeed exports to every node, and how gloo picks its interface"),
    Lesson("unreachable-master", "deepspeed_zero", "doctor.md", 15,
           "the address the ranks meet at must be reachable from every node"),
    Lesson("ephemeral-firewall", "deepspeed_zero", "doctor.md", 20,
           "the master port is not the only port: gloo's pairs use ephemeral ones"),
    Lesson("shm-full", "ddp", "cluster.md", 15,
           "where a node's ranks share memory, and what a crashed job leaves there"),
    Lesson("rank-branch", "ddp", "debugging.md", 20,
           "every rank must issue the same collectives in the same order"),
    Lesson("slow-link", "deepspeed_zero", "doctor.md", 20,
           "one slow node sets everyone's step time; finding which"),
)
BY_INCIDENT = {x.exercise: x for x in INCIDENTS}


def incident_rows() -> list[dict]:
    """One row an incident, in the course's order."""
    data = _read().get("incidents")
    data = data if isinstance(data, dict) else {}
    out = []
    for x in INCIDENTS:
        e = data.get(x.exercise) if isinstance(data.get(x.exercise), dict) else None
        out.append({"name": x.exercise, "lab": x.lab, "page": f"docs/{x.page}",
                    "minutes": x.minutes, "teaches": x.teaches, "folder": e and e["folder"],
                    "status": f"{e['outcome']} ({e['when']})" if e else "not started"})
    return out


def incident_lines() -> list[str]:
    """The incidents' rows as `dtlab exercise list` and `dtlab incident list` print them."""
    out = [f"    {'incident':<20} {'its job runs':<16} {'page':<22} {'min':>3}  you"]
    for r in incident_rows():
        out.append(f"    {r['name']:<20} {r['lab']:<16} {r['page']:<22} {r['minutes']:>3}  "
                   f"{r['status']}")
    return out
