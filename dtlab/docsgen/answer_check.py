"""The check behind docs/questions.md's sourcing table (answers.py): for each answer, the part of
its record that its ``Try:`` command wrote, and whether the answer's figure is rendered from that
part (the figure changes when that part of the record does). The test suite runs ``problems``."""
from __future__ import annotations

import json
from pathlib import Path

from dtlab.docsgen.answers import ANSWERS, Answer
from dtlab.docsgen.refresh import REFERENCES, _tables

NONE_LINE = "No figure can exist here:"
# flags that only say where a command writes, not what it measures
OUTPUT_FLAGS = ("--json", "--img", "--out", "--restart-json", "--work")


def _words(command: str) -> list[str]:
    """A command as words, ``sudo`` and ``.venv/bin/`` dropped, where it writes left out."""
    import shlex
    words = [w.replace(".venv/bin/", "") for w in shlex.split(command)]
    if words and words[0] == "sudo":
        words = words[1:]
    out = []
    while words:
        w = words.pop(0)
        if w in OUTPUT_FLAGS:
            words.pop(0) if words else None
        elif not w.startswith(tuple(f + "=" for f in OUTPUT_FLAGS)):
            out.append(w)
    return out


def _tour_index(command: str, runs: list[dict]) -> int | None:
    """The run of tour.json that ``dtlab run LAB [--nproc W] FLAGS`` is: the tour ran each lab
    with its registry flags (tour_args, then each of tour_more) at its tour size, in that order,
    so the k-th run of LAB in the record is the k-th flag set; ``--steps`` equal to the record's
    may be given."""
    from dtlab import registry
    words = _words(command)
    # `dtlab profile LAB` is the same run profiled, and the tour profiled every run
    if words[:1] != ["dtlab"] or words[1:2] not in (["run"], ["profile"]) or len(words) < 3 \
            or words[2] not in registry.LABS:
        return None
    lab = registry.LABS[words[2]]
    rest = words[3:]
    nproc = lab.tour_nproc
    if "--nproc" in rest:
        i = rest.index("--nproc")
        nproc = int(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    ours = [k for k, s in enumerate(runs) if s["lab"] == lab.name]
    for k, flags in zip(ours, [lab.tour_args, *lab.tour_more]):
        s = runs[k]
        given = list(rest)
        if "--steps" in given:
            i = given.index("--steps")
            if given[i + 1] != str(s["steps"]):
                continue
            given = given[:i] + given[i + 2:]
        if nproc == lab.tour_nproc and given == list(flags):  # the tour ran it at that size
            return k
    return None


def _walk(x, path=()):
    if isinstance(x, dict):
        if isinstance(x.get("command"), str):
            yield path, x["command"]
        for k, v in x.items():
            yield from _walk(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _walk(v, (*path, i))


# Records a script writes, and the part of each that holds a command's output as the script ran
# it (the test suite holds the script to the command: it must run it as written here).
SCRIPT_OUTPUTS = {
    ("gpu.json", "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"):
        ("tests/gpu/check.sh", ("gpu",)),
}


def resolve(a: Answer, ref_dir: Path) -> list[tuple]:
    """Where in ``a.record`` the output of ``a.command`` is: the JSON paths of what that command
    wrote (() for the whole record). A reference command of refresh.py whose argv is the command
    (less where it writes) wrote the whole record; a part that stores the command it ran
    (``command``) is that command's; a run of tour.json is found by lab, world size and flags.
    An empty list: the record holds nothing of that command."""
    rec = json.loads((Path(ref_dir) / a.record).read_text())
    want = _words(a.command)
    for r in REFERENCES:
        if a.record in (r.record, *r.more) and _words(" ".join(r.argv)) == want:
            return [()]
    if (a.record, a.command) in SCRIPT_OUTPUTS:
        return [SCRIPT_OUTPUTS[a.record, a.command][1]]
    if a.record == "tour.json":
        k = _tour_index(a.command, rec["runs"])
        return [] if k is None else [("runs", k)]
    paths = [p for p, cmd in _walk(rec) if _words(cmd) == want]
    return [p for p in paths if not any(p[:len(q)] == q and p != q for q in paths)]


def _perturb(x, seed=[0], strings=True):
    """The same structure with its measurements changed: each number that is not a count or a
    setting multiplied by a factor of its own, each message-like string marked."""
    keep = {"world_size", "steps", "P", "V", "M", "stages", "microbatches", "seq",
            "ranks_per_node", "nodes", "per_node", "seed", "batch_size", "seq_len", "stage",
            "size",
            "exit_status", "m", "k", "n", "tp", "cp", "replica", "rank", "dp", "pp"}
    if isinstance(x, dict):
        # "bytes" is a message size (a setting) in a benchmark's row, a count elsewhere
        fixed = keep | ({"bytes"} if "op" in x or "impl" in x else set())
        return {k: (v if k in fixed else _perturb(v, strings=strings)) for k, v in x.items()}
    if isinstance(x, list):
        return [_perturb(v, strings=strings) for v in x]
    if isinstance(x, bool):
        return not x if strings else x
    if x is None:
        return x
    if isinstance(x, (int, float)):
        seed[0] += 1
        f = 1.37 + 0.29 * (seed[0] % 7)  # neighbours differ: a ratio of two changes too
        y = x * f + (3 if isinstance(x, int) else 0.5 * f)  # a zero changes too, visibly
        return int(y) if isinstance(x, int) else y
    if strings and isinstance(x, str) and not x.startswith("dtlab") and "/" not in x and (
            (len(x) > 40 and " " in x) or (len(x) > 20 and "." in x and " " not in x)):
        return x + " (changed)"  # a message, a state-dict key: not a label a figure looks up
    return x


def _rendered(ref_dir: Path, tables: bool = True) -> dict[str, str]:
    """Every inline figure and (``tables``) marked table, as TAG:NAME, that the records of
    ``ref_dir`` render."""
    from dtlab.docsgen import lab_figures, ops_figures
    out = {**lab_figures.figures(ref_dir), **ops_figures.figures(ref_dir)}
    if not tables:  # the answers' own table renders the figures only
        return out
    for tag, (_pages, bodies) in _tables(ref_dir).items():
        out.update({f"{tag}:{name}": body for name, body in bodies.items() if tag != "answers"})
    return out


def depends(key: str, ref_dir: Path, record: str, paths: list[tuple],
            rendered: dict[str, str] | None = None) -> bool:
    """Whether the figure ``key`` changes when what the command wrote (``paths`` of ``record``)
    changes: the figure is that command's output, not another record's."""
    import shutil
    import tempfile
    before = (rendered if rendered is not None else _rendered(ref_dir)).get(key)
    after = None
    for strings in (True, False):  # a changed label may break a lookup: then numbers only
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "reference"
            shutil.copytree(ref_dir, copy, ignore=shutil.ignore_patterns("*.png", "*.csv"))
            rec = json.loads((copy / record).read_text())
            for path in paths:
                if not path:
                    rec = _perturb(rec, strings=strings)
                    continue
                node = rec
                for p in path[:-1]:
                    node = node[p]
                leaf = node[path[-1]]  # a command's whole output as text: mark it all
                node[path[-1]] = f"changed {leaf}" if isinstance(leaf, str) else \
                    _perturb(leaf, strings=strings)
            (copy / record).write_text(json.dumps(rec))
            try:
                after = _rendered(copy).get(key)
                break
            except (KeyError, ValueError, IndexError, StopIteration, TypeError, AttributeError):
                if not strings:
                    raise
    return before is not None and after != before


def problems(text: str, ref_dir: Path, numbers=None) -> list[str]:
    """What keeps each answer of questions.md (``text``) from being sourced as ANSWERS says: no
    parsed ``Try:`` command equal to its entry's, no marked figure of its key from that command's
    record, or (where none can exist) no reason line and published span of a known source."""
    import re

    from dtlab.docsgen.sources import SOURCES
    parts = re.split(r"^\*\*(\d+)\. ", text, flags=re.M)
    answers = {int(n): body.split("\n## ")[0].split("\n---")[0]
               for n, body in zip(parts[1::2], parts[2::2])}
    out = []
    rendered = _rendered(ref_dir)
    for n in sorted(answers if numbers is None else numbers):
        body, a = answers.get(n), ANSWERS.get(n)
        if a is None or body is None:
            out.append(f"question {n}: {'no ANSWERS entry' if a is None else 'not on the page'}")
            continue
        tries = [c for line in re.findall(r"^Try: .*$", body, flags=re.M)
                 for c in re.findall(r"`([^`]+)`", line)]
        if a.command not in tries:
            out.append(f"question {n}: no `Try:` line quotes `{a.command}`")
        if a.none_why:
            why = re.search(rf"^{NONE_LINE} (.+)$", body, flags=re.M)
            if not why or len(why.group(1).split()) < 8:
                out.append(f"question {n}: say '{NONE_LINE}' and why, in one line")
            pubs = re.findall(r"<!--pub:([\w.-]+)-->", body)
            if a.published not in SOURCES or a.published not in pubs:
                out.append(f"question {n}: no published figure of source {a.published!r} "
                           f"(sources.py) on the page")
        if a.key:
            marker = (f"<!-- {a.key} -->" if ":" in a.key else f"<!--fig:{a.key}-->")
            if marker not in body:
                out.append(f"question {n}: no {marker} in the answer")
            paths = resolve(a, ref_dir) if (Path(ref_dir) / a.record).is_file() else []
            if not paths:
                out.append(f"question {n}: {a.record} holds nothing `{a.command}` wrote")
            elif not depends(a.key, ref_dir, a.record, paths, rendered):
                out.append(f"question {n}: figure {a.key} is not rendered from what "
                           f"`{a.command}` wrote to {a.record}")
        if not a.key and not a.none_why:
            out.append(f"question {n}: neither a figure nor a reason none can exist")
    return out
