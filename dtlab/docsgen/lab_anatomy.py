"""What each lab's lines are for, counted from the source (ast): the algorithm, the command line,
library variants, bookkeeping for records and checkpoints, theory and demos, pictures, and the
docstring. How the labs are held to the lab contract (most near 200 lines, the algorithm the
larger part).

    python -m dtlab.docsgen.lab_anatomy                 # the labs as they are
    python -m dtlab.docsgen.lab_anatomy --rev d7191c8   # and at an older commit, side by side

A top-level definition (or a Strategy's method) counts as one kind by what it is: ``main``,
``make_parser``, ``check_args``, ``make_strategy`` and argparse code are the command line; a
class or function that wraps a library (``--impl`` torch, DeepSpeed, FairScale, FSDP2,
accelerate) is a variant; ``full_state``, ``canonical_state``, ``param_layout``, ``memory``,
``close`` and ``gather_*`` are bookkeeping; names with ``theory``, ``ideal``, ``analyse`` or
``demo`` are theory; anything that draws (matplotlib) is a picture. The rest is the algorithm.
"""
from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("algorithm", "cli", "variants", "bookkeeping", "theory", "pictures", "docstring")
CLI = {"main", "make_parser", "check_args", "make_strategy", "parse_lengths", "own_stage"}
BOOKKEEPING = {"full_state", "canonical_state", "load_canonical_state", "param_layout", "memory",
               "close", "gather_object", "num_params", "_joined", "_whole", "barrier"}
VARIANT_WORDS = ("torch", "library", "deepspeed", "fairscale", "fsdp", "dtensor", "accelerate")
THEORY_WORDS = ("theory", "ideal", "analyse", "analyze", "demo")


def _span(node: ast.AST) -> int:
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return node.end_lineno - start + 1


def _kind(node: ast.AST, source: str) -> str:
    name = getattr(node, "name", "")
    low = name.lower()
    text = ast.get_source_segment(source, node) or ""
    if "matplotlib" in text or "savefig" in text:
        return "pictures"
    if name in CLI or "argparse" in text.split("\n")[0]:
        return "cli"
    if name in BOOKKEEPING:
        return "bookkeeping"
    if any(w in low for w in THEORY_WORDS):
        return "theory"
    if isinstance(node, ast.ClassDef) and any(w in low for w in VARIANT_WORDS):
        return "variants"
    return "algorithm"


def anatomy(source: str) -> dict[str, int]:
    """Lines of ``source`` by kind (blank lines and comments between definitions go with the
    algorithm; imports with the command line's plumbing are left out of every kind)."""
    tree = ast.parse(source)
    counts = dict.fromkeys(KINDS, 0)
    counts["total"] = len(source.splitlines())
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                             ast.Constant):
        counts["docstring"] += _span(body[0])
        body = body[1:]
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ClassDef) and _kind(node, source) == "algorithm":
            inner = 0  # a strategy: each method by its own kind, the rest of the class algorithm
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    k = _kind(item, source)
                    counts[k] += _span(item)
                    inner += _span(item)
            counts["algorithm"] += _span(node) - inner
            continue
        counts[_kind(node, source)] += _span(node)
    return counts


def lab_sources(rev: str | None = None) -> dict[str, str]:
    """{lab name: source} of the labs (labs/*.py; at ``rev``, the lab files of that commit)."""
    if rev is None:
        return {p.stem: p.read_text() for p in sorted((ROOT / "labs").glob("*.py"))
                if p.stem != "__init__"}
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "labs/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {Path(n).stem: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout
            for n in names if n.endswith(".py") and not n.endswith("__init__.py")}


def table(now: dict[str, dict], before: dict[str, dict] | None = None) -> str:
    cols = ("total",) + KINDS
    head = ["lab"] + [f"{c} (before)" if before else c for c in cols] + ["algorithm share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in sorted(set(now) | set(before or {})):
        a, b = now.get(lab), (before or {}).get(lab)

        def cell(c):
            x = "-" if a is None else str(a[c])
            return f"{x} ({b[c]})" if before is not None and b is not None else x
        share = "-" if a is None else f"{a['algorithm'] / max(1, a['total'] - a['docstring']):.0%}"
        lines.append("| " + " | ".join([lab] + [cell(c) for c in cols] + [share]) + " |")
    totals = [a["total"] for a in now.values()]
    lines.append(f"\n{len(totals)} labs, {sum(totals)} lines, longest {max(totals)}, median "
                 f"{statistics.median(totals):.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtlab.docsgen.lab_anatomy",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rev", default=None, help="also count the labs of this git commit")
    args = p.parse_args(argv)
    now = {k: anatomy(v) for k, v in lab_sources().items()}
    before = {k: anatomy(v) for k, v in lab_sources(args.rev).items()} if args.rev else None
    print(table(now, before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
