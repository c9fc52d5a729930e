"""``dtlab docs``: the reference run behind docs/ (refresh.py: the reference commands, each
writing one record under docs/reference/; records/ holds the record makers) and the pages and
pictures rendered from it (lab_figures.py, ops_figures.py, concept_pictures.py, import_graph.py)."""
from __future__ import annotations

import sys


def cmd_docs(args, rest) -> int:
    from dtlab.docsgen import refresh
    try:
        return refresh.main(args)
    except refresh.DocsError as e:
        print(f"dtlab docs: {e}", file=sys.stderr)
        return 2


def add_commands(sub) -> None:
    from dtlab.docsgen import refresh  # no torch at import: its flags live there
    refresh.add_arguments(sub.add_parser(
        "docs", help="the reference run behind docs/: refresh (make docs), check, list",
        description=refresh.__doc__.split("\n\n")[0])).set_defaults(func=cmd_docs)
