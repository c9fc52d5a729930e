"""``dtlab docs refresh`` (``make docs``) and ``dtlab docs check``: the reference run behind every
measured figure in docs/.

REFERENCES declares the commands of the reference run, each writing one record under
docs/reference/. ``refresh`` runs them in turn (or the ``--only`` ones), writes
docs/reference/machine.json (the machine, CPU model, cores, memory, Python, torch and library
versions, the commit, and when each record was made and how long it took), then renders every
page: the marked tables (``<!-- TAG:name -->`` ... ``<!-- /TAG:name -->``), the inline figures
(``<!--fig:NAME-->`` ... ``<!--/fig-->``) and the pictures drawn from records or from the code.
``check`` renders into memory and names every table and figure a page holds that the records do
not give (the test suite runs it), every marker the renderer does not know, and every
measured-looking figure (a number with a unit of time, bandwidth or bytes) typed outside the spans
that account for it: ``<!--fig:KEY-->`` (a record's), ``<!--pub:SOURCE-->`` (published, its source
in sources.py) and ``<!--given-->`` (an input, a setting, arithmetic on figures the sentence
states). Code spans and blocks (commands, transcripts) are not read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dtlab.cluster.netns import Cluster, ClusterError
from dtlab.docsgen import import_graph as importgraph
from dtlab.docsgen import answers, lab_figures as docsfig, ops_figures as docsops
from dtlab.docsgen.lab_figures import load, machine_line
from dtlab.launch import sessions
from dtlab.plan import validate as planval
from dtlab.report import pictures

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Reference:
    name: str
    record: str                 # the file under docs/reference/ it writes
    argv: tuple[str, ...]       # run from the repository root; "dtlab" is this checkout's CLI
    minutes: float              # about how long on the 2-core reference machine
    root: bool = False          # needs root: the namespace cluster
    produces: str | None = None  # where the command writes the record, when not in place
    more: tuple[str, ...] = ()   # other records the same command writes


REFERENCES = (
    Reference("tour", "tour.json", ("dtlab", "tour", "--out", "runs/docs/tour", "--json",
                                    "docs/reference/tour.json"), 3),
    Reference("comm", "comm.json", ("dtlab", "bench", "comm", "--nproc", "2,4", "--impl",
                                    "library,ring,naive,tree", "--sizes",
                                    "1KiB,256KiB,1MiB,4MiB,16MiB,64MiB", "--iters", "20",
                                    "--json", "runs/docs/comm.json"), 1,
              produces="runs/docs/comm.json"),
    Reference("labs", "labs.json", ("python", "-m", "dtlab.docsgen.records.lab_runs", "--json",
                                    "docs/reference/labs.json", "--img", "docs/img"), 7),
    Reference("collectives", "faster-collectives.json",
              ("python", "-m", "dtlab.docsgen.records.collective_runs", "--json",
               "docs/reference/faster-collectives.json", "--img", "docs/img"), 3, root=True),
    Reference("schedules", "schedules-experts.json",
              ("python", "-m", "dtlab.docsgen.records.schedule_runs", "--json",
               "docs/reference/schedules-experts.json", "--img", "docs/img"), 2),
    Reference("zero-libraries", "zero-libraries.json",
              ("python", "-m", "dtlab.docsgen.records.zero_libraries", "--json",
               "docs/reference/zero-libraries.json"), 10),
    Reference("memory", "memory.json",
              ("python", "-m", "dtlab.docsgen.records.memory_cases", "--json",
               "docs/reference/memory.json"), 1),
    Reference("long-sequences", "long-sequences.json",
              ("python", "-m", "dtlab.docsgen.records.long_sequences", "--json",
               "docs/reference/long-sequences.json", "--img", "docs/img"), 5),
    Reference("reliability", "resharding.json",
              ("python", "-m", "dtlab.docsgen.records.reliability_runs", "--json", "docs/reference/resharding.json",
               "--restart-json", "docs/reference/reliability-restart.json"), 2,
              more=("reliability-restart.json",)),
    Reference("cluster", "cluster.json", ("dtlab", "bench", "cluster", "--out",
                                          "runs/docs/cluster"), 5, root=True,
              produces="runs/docs/cluster/cluster.json"),
    Reference("doctor", "doctor-collective.json",
              ("python", "-m", "dtlab.docsgen.records.doctor_cases", "--json",
               "docs/reference/doctor-collective.json"), 1.5, root=True),
    Reference("hang", "hang.json", ("dtlab", "bench", "hang", "--runs", "10", "--faults",
                                    "stall,mismatch,link", "--timeout", "5", "--json",
                                    "docs/reference/hang.json"), 11, root=True),
    Reference("plan-calibration", "plan-calibration.json",
              ("dtlab", "plan", "calibrate", "--cluster-rates", "100mbit,1gbit,unshaped",
               "--out", "docs/reference/plan-calibration.json"), 3, root=True),
    Reference("plan-validate", "plan-validate.json",
              ("dtlab", "plan", "validate", "--calibration",
               "docs/reference/plan-calibration.json", "--cluster-rates",
               "100mbit,1gbit,unshaped", "--json", "docs/reference/plan-validate.json",
               "--img", "docs/img"), 7, root=True),
    Reference("plan-measured", "plan-measured-h100.json",
              ("dtlab", "plan", "validate", "--measured-set", "playbook-h100", "--json",
               "docs/reference/plan-measured-h100.json", "--img", "docs/img"), 0.2),
    Reference("plan-search-1t", "plan-search-1t.json",
              ("dtlab", "bench", "plan", "--json", "docs/reference/plan-search-1t.json"), 0.1),
    Reference("questions", "questions.json",
              ("python", "-m", "dtlab.docsgen.records.question_runs", "--json",
               "docs/reference/questions.json"), 4.5),
    Reference("amp", "amp.json", ("python", "-m", "dtlab.docsgen.records.amp_runs", "--json",
                                  "docs/reference/amp.json"), 5),
    Reference("answers", "answers-q1-33.json",
              ("python", "-m", "dtlab.docsgen.records.answer_runs", "--json",
               "docs/reference/answers-q1-33.json"), 4),
    Reference("plan-a100", "plan-a100.json",
              ("dtlab", "plan", "--layers", "32", "--d-model", "4096", "--heads", "32", "--seq",
               "2048", "--batch", "512", "--nodes", "4", "--devices-per-node", "8",
               "--device-memory", "80GiB", "--peak-flops", "312e12", "--intra", "3,300",
               "--inter", "10,200", "--json", "docs/reference/plan-a100.json"), 0.1),
)
BY_NAME = {r.name: r for r in REFERENCES}
MIN_LIMIT_S = 600  # a reference command is stopped after 4x its minutes, and never sooner


class DocsError(Exception):
    """Bad input to ``dtlab docs``: one line naming the input and the fix."""


def _commit() -> str | None:
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    return p.stdout.strip() or None


# --------------------------------------------------------------------------- running


def _argv(ref: Reference) -> list[str]:
    """The command as this Python runs it: ``dtlab`` and ``python`` become this interpreter, so
    a refresh from .venv/bin/dtlab uses the same environment throughout."""
    head, *rest = ref.argv
    if head == "dtlab":
        return [sys.executable, "-m", "dtlab", *rest]
    if head == "python":
        return [sys.executable, *rest]
    return list(ref.argv)


def _cluster_up(log: Path) -> bool:
    """The 2-node namespace cluster the multi-node references run on (with Slurm, as the
    collectives' record needs): brought up when it is not; True if this call did."""
    try:
        Cluster.load("main")
        return False
    except ClusterError:
        pass
    print("  bringing the namespace cluster up (2 nodes, Slurm)", flush=True)
    with open(log, "w") as f:
        try:  # a failed up rolls itself back; one killed at its limit or by Ctrl-C cannot
            p = sessions.run([sys.executable, "-m", "dtlab", "cluster", "up", "--nodes", "2",
                              "--slurm"], timeout=900, cwd=ROOT, stdout=f,
                             stderr=subprocess.STDOUT)
        except BaseException:
            _cluster_down()
            raise
    if p.returncode != 0:
        raise DocsError(f"dtlab cluster up failed (exit {p.returncode}); log: {log}")
    return True


def _cluster_down() -> None:
    subprocess.run([sys.executable, "-m", "dtlab", "cluster", "down"], cwd=ROOT,
                   capture_output=True, timeout=600)


def run_references(names: list[str], ref_dir: Path, logs: Path) -> int:
    """Run the named references in order, each with its log; stop at the first failure. The
    namespace cluster is brought up for the root ones (and down again after, if it was not up)."""
    if any(BY_NAME[n].root for n in names) and os.geteuid() != 0:
        need = ", ".join(n for n in names if BY_NAME[n].root)
        raise DocsError(f"{need} need root (the namespace cluster): run `sudo .venv/bin/dtlab "
                        f"docs refresh`, or leave them out with --only")
    logs.mkdir(parents=True, exist_ok=True)
    started = any(BY_NAME[n].root for n in names) and os.geteuid() == 0 and \
        _cluster_up(logs / "cluster-up.log")
    try:
        return _run(names, ref_dir, logs)
    finally:
        if started:
            _cluster_down()


def _made_by(ref, ref_dir: Path) -> list[Path]:
    """The files a reference command must write: its record (or the file it produces, which
    becomes its record) and the records it makes besides."""
    return [ROOT / ref.produces if ref.produces else ref_dir / ref.record,
            *(ref_dir / m for m in ref.more)]


def _signature(path: Path) -> tuple | None:
    """What changes when a file is rewritten (a rename gives a new inode, a write a new mtime);
    None when there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def _run(names: list[str], ref_dir: Path, logs: Path) -> int:
    from dtlab.report import records  # torch: the CLI parser imports this
    meta_path = ref_dir / "machine.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update({"what": "the reference run behind docs/ (dtlab docs refresh)",
                 "date": time.strftime("%Y-%m-%d"), "machine": records.machine(),
                 "commit": _commit()})
    meta.setdefault("records", {})
    total = sum(BY_NAME[n].minutes for n in names)
    print(f"dtlab docs refresh: {len(names)} reference command(s), about {total:.0f} min here")
    failed = []
    for i, name in enumerate(names, 1):
        ref = BY_NAME[name]
        log = logs / f"{name}.log"
        print(f"[{i}/{len(names)}] {name} (about {ref.minutes:g} min): {' '.join(ref.argv)}",
              flush=True)
        t0 = time.perf_counter()
        made = _made_by(ref, ref_dir)
        before = {path: _signature(path) for path in made}
        with open(log, "w") as f:
            try:  # a timeout ends the command and every process it started
                rc = sessions.run(_argv(ref), timeout=max(MIN_LIMIT_S, ref.minutes * 60 * 4), cwd=ROOT,
                                  stdout=f, stderr=subprocess.STDOUT).returncode
                why = f"exit {rc}"
            except subprocess.TimeoutExpired as e:
                rc, why = 124, f"stopped after its limit of {e.timeout:.0f} s"
        took = time.perf_counter() - t0
        stale = [path for path in made if rc == 0 and _signature(path) in (None, before[path])]
        if stale:
            rc, why = 1, (f"exit 0, but it did not write {', '.join(map(str, stale))}")
        if rc != 0:  # the others still run: one broken record should not cost the hour
            print(f"  FAILED ({why}) after {took:.0f} s; its record is unchanged; log: {log}",
                  file=sys.stderr, flush=True)
            failed.append(name)
            continue
        if ref.produces:
            (ref_dir / ref.record).write_text((ROOT / ref.produces).read_text())
        for record in (ref.record, *ref.more):
            meta["records"][record] = {"command": " ".join(ref.argv),
                                       "date": time.strftime("%Y-%m-%d %H:%M"),
                                       "seconds": round(took, 1)}
        print(f"  done in {took:.0f} s: docs/reference/{ref.record}", flush=True)
        from dtlab.measure.run_record import atomic_write_text  # torch: the CLI parser imports this
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    if failed:
        print(f"dtlab docs refresh: {', '.join(failed)} FAILED; the docs are rendered from the "
              f"records as they are", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------- rendering


def _tables(ref_dir: Path) -> dict[str, tuple[tuple[str, ...], dict[str, str]]]:
    """tag -> (pages, {name: body}) for every marked table the docs hold."""
    from dtlab.docsgen.records import (  # torch: the CLI parser imports this
        collective_runs as commexp, long_sequences as longseq, schedule_runs as schedexp)
    return {
        "commexp": (commexp.PAGES, commexp.tables(load(ref_dir, "faster-collectives.json"))),
        "schedexp": (schedexp.PAGES, schedexp.tables(load(ref_dir, "schedules-experts.json"))),
        "longseq": (longseq.PAGES, longseq.tables(load(ref_dir, "long-sequences.json"))),
        "plan": (planval.PAGES, planval.tables(load(ref_dir, "plan-validate.json"),
                                               load(ref_dir, "plan-a100.json"))),
        "answers": (("questions.md",), {"table": answers.table(ref_dir)}),
        "ref": (docsfig.PAGES + docsops.PAGES + ("index.md",),
                {**docsfig.tables(ref_dir), **docsops.tables(ref_dir),
                 "records": records_table(ref_dir)}),
    }


def records_table(ref_dir: Path) -> str:
    """Every record under docs/reference/: the command that makes it and when it was made (as
    machine.json has it for a refreshed record, else the record's own date)."""
    meta = load(ref_dir, "machine.json")
    made = meta.get("records", {})
    lines = [f"Reference machine: {machine_line(meta['machine'], meta.get('date', '-'))}; "
             f"commit {meta.get('commit') or '-'}.", "",
             "| record | command (`dtlab docs refresh` runs it) | made | seconds |",
             "|---|---|---|---|"]
    known = set()
    for r in REFERENCES:
        for record in (r.record, *r.more):
            known.add(record)
            own = load(ref_dir, record).get("date", "-")
            when = made.get(record, {})
            lines.append(f"| `{record}` | `{' '.join(r.argv)}`{' (root)' if r.root else ''} | "
                         f"{when.get('date', own)} | {when.get('seconds', '-')} |")
    for path in sorted(Path(ref_dir).glob("*.json")):
        if path.name in known or path.name == "machine.json":
            continue
        rec = json.loads(path.read_text())
        what = rec.get("what") or rec.get("command")
        lines.append(f"| `{path.name}` | not rerun by refresh: {what} | {rec.get('date', '-')} "
                     f"| - |")
    return "\n".join(lines)


FIG = re.compile(r"<!--fig:([\w.-]+)-->(.*?)<!--/fig-->", flags=re.S)
BLOCK = re.compile(r"<!-- (\w+):(\w+) -->\n(.*?)\n?<!-- /\1:\2 -->", flags=re.S)
OPEN = re.compile(r"<!-- (\w+):(\w+) -->")


def render_page(text: str, tables: dict, figures: dict[str, str], page: str,
                problems: list[str]) -> str:
    """The page with its marked tables and inline figures as the records give them; what it
    cannot render (an unknown marker) goes to ``problems``."""
    def block(m):
        tag, name = m.group(1), m.group(2)
        if tag not in tables or page not in tables[tag][0] or name not in tables[tag][1]:
            problems.append(f"{page}: table <!-- {tag}:{name} --> has no renderer")
            return m.group(0)
        return f"<!-- {tag}:{name} -->\n{tables[tag][1][name]}\n<!-- /{tag}:{name} -->"

    def fig(m):
        if m.group(1) not in figures:
            problems.append(f"{page}: figure <!--fig:{m.group(1)}--> is not in the records")
            return m.group(0)
        return f"<!--fig:{m.group(1)}-->{figures[m.group(1)]}<!--/fig-->"

    closed = {(m.group(1), m.group(2)) for m in BLOCK.finditer(text)}
    for m in OPEN.finditer(text):
        if (m.group(1), m.group(2)) not in closed:
            problems.append(f"{page}: table <!-- {m.group(1)}:{m.group(2)} --> is not closed by "
                            f"<!-- /{m.group(1)}:{m.group(2)} -->")
    return FIG.sub(fig, BLOCK.sub(block, text))


# A figure that looks measured: a number with a unit of time, bandwidth or bytes ("B" alone only
# after a space, so "7B parameters" is not read as bytes).
MEASURED = re.compile(
    r"(?<![\w.])\d[\d,.]*(?:e[-+]?\d+)?(?:\s?(?:ns|us|µs|ms|min|h|seconds|minutes|hours|KB|KiB|kB|"
    r"MB|MiB|GB|GiB|TB|TiB|bytes|Gbit/s|Mbit/s|GB/s|MB/s|GiB/s|Gb/s|Gbps|gbit|mbit|TB/s)|"
    r"\s(?:s|B))(?![\w/])")
# what exempts one: a record's figure or table, a published figure with its source, a figure
# given (an input, a setting, arithmetic on stated figures); code is a command or a transcript
MARKED = re.compile(r"<!--(fig|pub|given)(?::([\w.-]+))?-->(.*?)<!--/\1-->|"
                    r"<!-- (\w+):(\w+) -->.*?<!-- /\4:\5 -->", flags=re.S)
CODE = re.compile(r"```.*?```|`[^`\n]*`", flags=re.S)
SPAN_OPEN = re.compile(r"<!--(fig|pub|given)(?::[\w.-]+)?-->")


def typed_figures(text: str, page: str) -> list[str]:
    """The measured-looking figures of a page outside the spans that account for them, and the
    published spans whose source sources.py does not know: one line each, with its line."""
    from dtlab.docsgen.sources import SOURCES
    out = []

    def blank(m):  # keep the line count, so a line number is the page's own
        return re.sub(r"[^\n]", " ", m.group(0))

    no_code = CODE.sub(blank, text)
    for m in MARKED.finditer(no_code):
        if m.group(1) == "pub" and m.group(2) not in SOURCES:
            out.append(f"{page}:{no_code.count(chr(10), 0, m.start()) + 1}: published figure "
                       f"{m.group(3)!r} names source {m.group(2)!r}, which "
                       f"dtlab/docsgen/sources.py does not have")
    bare = MARKED.sub(blank, no_code)
    for m in SPAN_OPEN.finditer(bare):
        out.append(f"{page}:{bare.count(chr(10), 0, m.start()) + 1}: {m.group(0)} is not closed "
                   f"by <!--/{m.group(1)}-->")
    for m in MEASURED.finditer(bare):
        out.append(f"{page}:{bare.count(chr(10), 0, m.start()) + 1}: typed figure "
                   f"{m.group(0)!r}: render it from its record (<!--fig:KEY-->), mark it "
                   f"published (<!--pub:SOURCE-->) or given (<!--given-->)")
    return out


def render(docs: Path, ref_dir: Path, write: bool) -> list[str]:
    """Render every page of ``docs`` (and README.md beside it) from ``ref_dir``; write the pages
    that change when ``write``; the differences and problems, one line each."""
    from dtlab.measure.run_record import atomic_write_text  # torch: the CLI parser imports this
    tables = _tables(ref_dir)
    figures = {**docsfig.figures(ref_dir), **docsops.figures(ref_dir)}
    out: list[str] = []
    for path in pages(docs):
        text = path.read_text()
        new = render_page(text, tables, figures, path.name, out)
        if new != text:
            old_blocks = {(t, n): b for t, n, b in BLOCK.findall(text)}
            for t, n, b in BLOCK.findall(new):
                if old_blocks.get((t, n)) != b:
                    out.append(f"{path.name}: table <!-- {t}:{n} --> differs from the record")
            old_figs = dict(FIG.findall(text))
            for k, v in FIG.findall(new):
                if old_figs.get(k) != v:
                    out.append(f"{path.name}: figure {k} reads {old_figs.get(k)!r}, the record "
                               f"gives {v!r}")
            if write:
                atomic_write_text(path, new)
    return out


def pages(docs: Path) -> list[Path]:
    """The pages ``dtlab docs`` renders and checks: docs/*.md and README.md beside it."""
    return [p for p in sorted(Path(docs).glob("*.md")) + [Path(docs).parent / "README.md"]
            if p.is_file()]


def unsourced(docs: Path) -> list[str]:
    """Every page's typed measured-looking figures and unknown sources (typed_figures)."""
    return [line for path in pages(docs) for line in typed_figures(path.read_text(), path.name)]


def draw(ref_dir: Path, img: Path) -> list[Path]:
    """The pictures drawn from records (the tour's, the collectives') and from the code (the
    concepts, the import graph). The record tools draw their own pictures when they run."""
    from dtlab.docsgen import concept_pictures as concepts  # torch: the CLI parser imports this
    from dtlab.bench import cluster as clusterbench, collectives as commbench
    img.mkdir(parents=True, exist_ok=True)
    runs = load(ref_dir, "tour.json")["runs"]
    pics = [pictures.plot_losses(runs, img / "tour-loss.png"),
            pictures.plot_memory(runs, img / "tour-memory.png"),
            pictures.plot_comm(runs, img / "tour-comm.png"),
            commbench.plot_busbw(load(ref_dir, "comm.json")["rows"], img / "comm-busbw.png"),
            clusterbench.plot(load(ref_dir, "cluster.json"), img / "cluster-links.png")]
    return pics + concepts.draw_all(img) + [importgraph.draw(importgraph.graph(),
                                                             img / "architecture.png")]


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("action", choices=("refresh", "check", "list"),
                   help="refresh: run the reference commands and render docs; check: does every "
                        "figure in docs equal the records; list: the reference commands")
    p.add_argument("--only", default=None,
                   help=f"refresh: these references only (comma list of {', '.join(BY_NAME)})")
    p.add_argument("--render", action="store_true",
                   help="refresh: run nothing, render docs and pictures from the records")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="the docs folder (default: docs/)")
    return p


def main(args) -> int:
    docs = Path(args.docs)
    ref_dir = docs / "reference"
    if args.action == "list":
        for r in REFERENCES:
            print(f"{r.name:17} {r.minutes:>5g} min{' root' if r.root else '     '}  "
                  f"docs/reference/{r.record}\n{'':34}{' '.join(r.argv)}")
        return 0
    if not ref_dir.is_dir():
        raise DocsError(f"--docs {docs}: no reference/ folder there; give the docs folder")
    if args.action == "check":
        problems = render(docs, ref_dir, write=False) + unsourced(docs)
        for line in problems:
            print(line)
        print("docs agree with docs/reference/" if not problems else
              f"{len(problems)} difference(s): `dtlab docs refresh --render` writes them")
        return 1 if problems else 0
    names = [n.strip() for n in (args.only or "").split(",") if n.strip()] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise DocsError(f"--only: unknown reference(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(BY_NAME)}")
    rc = 0 if args.render else run_references(names, ref_dir, ROOT / "runs" / "docs" / "logs")
    changed = render(docs, ref_dir, write=True)
    pics = draw(ref_dir, docs / "img")
    print(f"rendered: {len(changed)} table(s)/figure(s) changed, {len(pics)} picture(s) drawn")
    typed = unsourced(docs)
    for line in typed:
        print(line)
    if typed:
        print(f"{len(typed)} figure(s) not accounted for: `dtlab docs check` fails on them")
    return rc
