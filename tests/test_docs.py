"""Every command quoted in README.md and docs/*.md is a real invocation that parses: dtlab
subcommands and their lab flags, `torchrun ... -m labs.X`, `python -m labs.X`, the launcher and
sbatch scripts. A renamed flag breaks this test instead of a reader's first try."""
import importlib
import re
import shlex

import pytest

from conftest import ROOT

PLACEHOLDER = re.compile(r"\b(LAB|N|G|S|P|DIR|FILE|F|A|CONFIG|HOST0|JOB|NAME|SLOT|i|h)\b")


def quoted_commands():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        # commands live in plain (or shell) blocks; ```python blocks are code, such as the
        # example lab of architecture.md with the command in its docstring
        for lang, block in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S):
            if lang == "python":
                continue
            lines = block.replace("\\\n", " ").splitlines()
            for line in lines:
                cmd = line.split("#")[0].strip()
                # `sudo .venv/bin/dtlab ...` is the same command as `dtlab ...`
                cmd = re.sub(r"^sudo\s+", "", cmd).replace(".venv/bin/", "")
                if re.match(r"^(\w+=\S+\s+)*(dtlab(?=\s|$)|torchrun|python|launchers/|sbatch|deepspeed|"
                            r"accelerate launch|ACCELERATE_USE_CPU)", cmd) and "..." not in cmd \
                        and not any(PLACEHOLDER.fullmatch(w) for w in shlex.split(cmd)):
                    yield doc.name, cmd  # usage patterns (`dtlab run LAB --nproc N`) left out
        # and the commands an answer tells the reader to try, inline
        for line in re.findall(r"^Try: .*$", text, flags=re.M):
            for cmd in re.findall(r"`((?:sudo )?(?:dtlab|python -m|torchrun) [^`]*)`", line):
                cmd = re.sub(r"^sudo\s+", "", cmd)
                if not any(PLACEHOLDER.fullmatch(w) for w in shlex.split(cmd)):
                    yield doc.name, cmd


COMMANDS = sorted(set(quoted_commands()))


def lab_args_parse(lab: str, args: list[str]):
    mod = importlib.import_module(f"labs.{lab}")
    mod.make_parser().parse_args(args)


@pytest.mark.parametrize("doc,cmd", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_quoted_command_parses(doc, cmd):
    words = shlex.split(cmd)
    while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    if "&&" in words:
        words = words[:words.index("&&")]
    head = words[0]
    if head == "dtlab":
        from dtlab.cli import make_parser
        args, rest = make_parser().parse_known_args(words[1:])
        if args.command in ("run", "profile"):
            # `profile compare` hands the common flags to every lab it profiles
            lab_args_parse("ddp" if args.lab == "compare" else args.lab, rest)
        elif args.command == "bench" and args.bench == "comm":
            from dtlab.bench import collectives as commbench
            commbench.validate(commbench.make_parser().parse_args(rest))
        else:
            assert not rest, f"unknown flags {rest} in: {cmd}"
    elif head in ("torchrun", "python", "deepspeed") or cmd.startswith("accelerate launch"):
        assert "-m" in words or "--module" in words, cmd
        flag = "-m" if "-m" in words else "--module"
        module = words[words.index(flag) + 1]
        assert module.startswith(("labs.", "dtlab.")), cmd
        rest = words[words.index(flag) + 2:]
        if module.startswith("dtlab."):
            importlib.import_module(module).make_parser().parse_args(rest)
        else:
            lab_args_parse(module.split(".", 1)[1], rest)
    elif head.startswith("launchers/"):
        script = ROOT / head
        assert script.is_file() and script.stat().st_mode & 0o111, cmd
        rest = words[1:]
        if head.endswith("accelerate.sh"):
            assert rest[0] in ("single", "multi_cpu", "multi_gpu", "deepspeed", "fsdp"), cmd
            lab_args_parse("accelerate_lab", rest[1:])
        elif rest and not rest[0].startswith("-"):
            lab_args_parse(rest[0], rest[1:])
    elif head == "sbatch":
        script = next(w for w in words if w.startswith("slurm/"))
        assert (ROOT / script).is_file(), cmd
        rest = words[words.index(script) + 1:]
        lab_args_parse(rest[0], rest[1:])


def test_the_docs_quote_commands():
    assert len(COMMANDS) > 40


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    import re
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_questions_page_answers_all_67_in_order():
    import re
    text = (ROOT / "docs" / "questions.md").read_text()
    numbers = [int(n) for n in re.findall(r"^\*\*(\d+)\. ", text, flags=re.M)]
    assert numbers == list(range(1, 68))
    shared = ROOT.parent / "shared" / "QUESTIONS.md"
    if shared.is_file():  # the project's question list, where this checkout has it
        asked = re.findall(r"^(\d+)\. ", shared.read_text(), flags=re.M)
        assert len(asked) == len(numbers)


def _answer_range() -> list[int] | None:
    """DTLAB_ANSWERS=1-33 checks only those answers (while a range is being written)."""
    import os
    text = os.environ.get("DTLAB_ANSWERS")
    if not text:
        return None
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


DTLAB_HEADS = ("dtlab ", "torchrun ", "python -m ", "deepspeed ", "accelerate launch",
               "launchers/", "sbatch ")


def test_every_answer_is_sourced():
    """Every answer of questions.md has an entry in dtlab/docsgen/answers.py and holds to it: a
    `Try:` line quoting its command (a command that parses), and a marked figure of its key
    rendered from what that command wrote to its record (the figure changes when that part of
    the record does); or, where no figure can exist here, the `No figure can exist here:` line
    with its reason and a published span of a known source."""
    from dtlab.docsgen import answer_check, answers
    numbers = _answer_range()
    if numbers is None:
        assert sorted(answers.ANSWERS) == list(range(1, 68))
    for n, a in answers.ANSWERS.items():
        cmd = a.command.removeprefix("sudo ")
        if (numbers is None or n in numbers) and cmd.startswith(DTLAB_HEADS):
            test_quoted_command_parses("questions.md", cmd)  # (nvidia-smi, ds_report: not ours)
    for (record, command), (script, _) in answer_check.SCRIPT_OUTPUTS.items():
        assert command in (ROOT / script).read_text(), f"{script} does not run {command}"
    problems = answer_check.problems((ROOT / "docs" / "questions.md").read_text(),
                                ROOT / "docs" / "reference", numbers)
    assert not problems, "answers not sourced:\n" + "\n".join(problems)


def test_the_sourcing_check_catches_a_figure_from_another_command(tmp_path):
    """An answer whose figure is another command's output, or whose page lost its `Try:` line,
    fails the check."""
    from dataclasses import replace

    from dtlab.docsgen import answer_check, answers
    text = (ROOT / "docs" / "questions.md").read_text()
    ref = ROOT / "docs" / "reference"
    good = answers.ANSWERS[4]
    try:  # the pipeline's command, DDP's figure
        answers.ANSWERS[4] = replace(good, key="run.ddp.torch.sent")
        assert any("figure run.ddp.torch.sent is not rendered from" in p or
                   "no <!--fig:run.ddp.torch.sent-->" in p
                   for p in answer_check.problems(text, ref, [4]))
    finally:
        answers.ANSWERS[4] = good
    cut = text.replace("Try: `dtlab run pipeline --nproc 2`:", "Then:", 1)
    assert any("no `Try:` line" in p for p in answer_check.problems(cut, ref, [4]))


def test_doc_links_and_anchors_resolve():
    import re
    docs = ROOT / "docs"
    pages = {p.name: p.read_text() for p in docs.glob("*.md")}
    anchors = {name: {_slug(h) for h in re.findall(r"^#+ (.+)$", t, flags=re.M)}
               for name, t in pages.items()}
    bad = []
    for name, text in pages.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            if path.endswith(".md"):
                if path not in pages:
                    bad.append(f"{name}: {target} (no such page)")
                elif anchor and anchor not in anchors[path]:
                    bad.append(f"{name}: {target} (no such heading)")
            elif path and not (docs / path).exists():
                bad.append(f"{name}: {target} (no such file)")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- docs = records

def test_every_figure_in_docs_is_the_records():
    """`dtlab docs check`: every marked table and inline figure of every page equals what
    docs/reference/ renders (`dtlab docs refresh --render` writes them), and no marker is
    unknown to the renderer; and no page types a measured-looking figure that no record, source
    or stated input accounts for."""
    from dtlab.docsgen.refresh import render, unsourced
    problems = render(ROOT / "docs", ROOT / "docs" / "reference", write=False)
    problems += unsourced(ROOT / "docs")
    assert not problems, "\n".join(problems)


def test_a_typed_measured_figure_fails_the_check(tmp_path, capsys):
    """A figure with a unit of time, bandwidth or bytes typed into a page fails `dtlab docs
    check`; inside a record's span, a published span with a known source, a given span or code
    it does not; a published span with an unknown source and an unclosed span fail."""
    import argparse

    from dtlab.docsgen import refresh as docsref
    docs = _docs_copy(tmp_path)
    ddp = docs / "ddp.md"
    ddp.write_text(ddp.read_text() + "\nThe overlapped step took 12.5 ms and sent 106 KiB, "
                   "and 3 ranks moved 1.2 GB/s.\n")
    args = argparse.Namespace(action="check", docs=str(docs), only=None, render=False)
    assert docsref.main(args) == 1
    out = capsys.readouterr().out
    n = len(ddp.read_text().splitlines())
    for figure in ("12.5 ms", "106 KiB", "1.2 GB/s"):
        assert f"ddp.md:{n}: typed figure '{figure}'" in out
    assert "3 ranks" not in out
    # every way of accounting for a figure passes; a bad source and an open span do not
    assert docsref.typed_figures(
        "A <!--pub:nvidia-h100-->989 TFLOP/s, 3.35 TB/s<!--/pub--> peak (NVIDIA's datasheet), "
        "a bucket of <!--given-->25 MiB<!--/given-->, `--bucket-mb 25 # 25 MiB`, a 7B model,\n"
        "```\nstep 3: 41.2 ms\n```\n", "x.md") == []
    bad = docsref.typed_figures("<!--pub:my-blog-->1 GB/s<!--/pub--> and <!--given-->2 s\n",
                                "x.md")
    assert any("names source 'my-blog'" in b for b in bad), bad
    assert any("<!--given--> is not closed" in b for b in bad), bad
    assert any("typed figure '2 s'" in b for b in bad), bad


def _docs_copy(tmp_path):
    import shutil
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("img"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return docs


def test_a_figure_edited_by_hand_fails_the_check(tmp_path, capsys):
    import argparse

    from dtlab.docsgen import refresh as docsref
    docs = _docs_copy(tmp_path)
    page = docs / "communication.md"
    text = page.read_text()
    m = docsref.FIG.search(text)
    assert m, "communication.md quotes figures from the records"
    page.write_text(text.replace(m.group(0), f"<!--fig:{m.group(1)}-->12.3 ms<!--/fig-->", 1))
    tour = docs / "tour.md"
    tour.write_text(tour.read_text().replace("| baseline | single | 1 |",
                                             "| baseline | single | 9 |"))
    (docs / "zero.md").write_text((docs / "zero.md").read_text()
                                  + "\n<!--fig:no.such.figure-->1<!--/fig-->\n")
    args = argparse.Namespace(action="check", docs=str(docs), only=None, render=False)
    assert docsref.main(args) == 1
    out = capsys.readouterr().out
    assert f"communication.md: figure {m.group(1)} reads '12.3 ms'" in out
    assert "tour.md: table <!-- ref:tour --> differs from the record" in out
    assert "zero.md: figure <!--fig:no.such.figure--> is not in the records" in out
    # rendering puts the record's figures back, and then the copy agrees
    args.action, args.render = "refresh", True
    problems = docsref.render(docs, docs / "reference", write=True)
    assert problems and docsref.render(docs, docs / "reference", write=False) == [
        "zero.md: figure <!--fig:no.such.figure--> is not in the records"]
    assert page.read_text() == text


def test_docs_cli_refuses_bad_input(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "dtlab", "docs", "refresh", "--only", "tour,nope",
                        "--render"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "--only: unknown reference(s) nope" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "dtlab", "docs", "check", "--docs", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "no reference/ folder there" in p.stderr
    p = subprocess.run([sys.executable, "-m", "dtlab", "docs", "list"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and "docs/reference/tour.json" in p.stdout


def test_every_reference_command_parses():
    """The commands `dtlab docs refresh` runs are real invocations (a renamed flag breaks this
    test, not the next refresh an hour in)."""
    from dtlab.docsgen.refresh import REFERENCES
    for ref in REFERENCES:
        test_quoted_command_parses("docsref", " ".join(ref.argv))


def test_concept_pictures_come_from_the_code(tmp_path):
    """The ring picture replays ``ring.schedule``, the schedule the ring all-reduce runs: after
    W-1 reduce-scatter steps rank r holds chunk r+1 summed over every rank, after W-1 all-gather
    steps every rank holds every chunk summed; the four pictures are drawn."""
    from dtlab.docsgen import concept_pictures as concepts
    for world in (2, 3, 4, 5):
        states = concepts.ring_states(world)
        assert len(states) == 2 * world - 1
        after_rs, end = states[world - 1], states[-1]
        assert all(after_rs[r][(r + 1) % world] == set(range(world)) for r in range(world))
        assert all(c == set(range(world)) for row in end for c in row)
    pics = concepts.draw_all(tmp_path)
    assert len(pics) == 4 and all(p.stat().st_size > 10_000 for p in pics)


def test_refresh_counts_a_record_only_when_its_command_rewrote_it(tmp_path, monkeypatch):
    """A reference command that exits 0 without writing its record fails, one that rewrites it
    counts, and one past its limit is stopped with everything it started, a process in a
    session of its own included."""
    import json
    import os
    import time

    from dtlab.docsgen import refresh as docsref
    (tmp_path / "stale.json").write_text("{}")
    pidfile = tmp_path / "orphan.pid"
    spawn = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(600)'], start_new_session=True); "
             f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    refs = [docsref.Reference("stale", "stale.json", ("python", "-c", "pass"), 0),
            docsref.Reference("fresh", "fresh.json", ("python", "-c", "import pathlib; pathlib."
                              f"Path({str(tmp_path / 'fresh.json')!r}).write_text('{{}}')"), 0),
            docsref.Reference("slow", "slow.json", ("python", "-c", spawn), 0)]
    monkeypatch.setattr(docsref, "BY_NAME", {r.name: r for r in refs})
    monkeypatch.setattr(docsref, "MIN_LIMIT_S", 3)
    assert docsref._run(["stale", "fresh", "slow"], tmp_path, tmp_path) == 1
    meta = json.loads((tmp_path / "machine.json").read_text())
    assert sorted(meta["records"]) == ["fresh.json"]
    orphan = int(pidfile.read_text())
    time.sleep(0.2)
    try:
        os.kill(orphan, 0)
        state = open(f"/proc/{orphan}/stat").read().rsplit(")", 1)[1].split()[0]
    except ProcessLookupError:
        state = "gone"
    assert state in ("gone", "Z"), f"the slow command's own-session child {orphan} survived"
