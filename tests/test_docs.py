"""Every command quoted in README.md and docs/*.md is a real invocation that parses: dtlab
subcommands and their lab flags, `torchrun ... -m labs.X`, `python -m labs.X`, the launcher and
sbatch scripts. A renamed flag breaks this test instead of a reader's first try."""
import importlib
import re
import shlex
from pathlib import Path

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
            from dtlab.tools import commbench
            commbench.validate(commbench.make_parser().parse_args(rest))
        else:
            assert not rest, f"unknown flags {rest} in: {cmd}"
    elif head in ("torchrun", "python", "deepspeed") or cmd.startswith("accelerate launch"):
        assert "-m" in words or "--module" in words, cmd
        flag = "-m" if "-m" in words else "--module"
        module = words[words.index(flag) + 1]
        assert module.startswith(("labs.", "dtlab.tools.")), cmd
        rest = words[words.index(flag) + 2:]
        if module.startswith("dtlab.tools."):
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
