"""The import graph of dtlab and the labs, read from the source (ast), checked against the layers,
and drawn.

    python -m dtlab.docsgen.import_graph                # the graph as text, then the check
    python -m dtlab.docsgen.import_graph --png docs/img/architecture.png

Layers, from the bottom; each may import only what its row allows (and the standard library and
third-party packages):

    base         dtlab.errors, dtlab.registry,    nothing of dtlab (standard library only;
                 dtlab.plotting                   plotting sets matplotlib up on first use)
    costmodel    dtlab.costmodel.*                base (and no torch)
    measure      dtlab.measure.*                  base, costmodel
    train        dtlab.train.*                    base, costmodel, measure
    reliability  dtlab.reliability.*              base, costmodel, measure, train
    collectives  dtlab.collectives.*              base, costmodel, measure, train
    harness      dtlab.harness                    base, costmodel, measure, train, reliability
    labs         labs.*                           the above, collectives, harness, labs
    library      labs.library.*                   what labs may, and labs
    exercises    dtlab.exercises.*                what labs may, labs, library
    cluster      dtlab.cluster.*                  base
    commands     dtlab.{launch,report,bench,doctor,plan}.*   what labs may but harness, and
                                                  cluster and commands (never labs, library or
                                                  exercises: labs are reached by launching them)
    incidents    dtlab.incidents.*                what commands may, and exercises (the course's
                                                  state) and incidents
    docsgen      dtlab.docsgen.*                  anything but cli
    cli          dtlab.cli, dtlab, dtlab.__main__  anything

and no cycle anywhere. tests/test_architecture.py fails on any violation; docs/architecture.md
shows the picture this module draws.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter, defaultdict
from pathlib import Path
from dtlab.plotting import plt_agg

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dtlab", "labs")
ORDER = ("base", "costmodel", "measure", "train", "reliability", "collectives", "harness", "labs",
         "library", "exercises", "cluster", "commands", "incidents", "docsgen", "cli")
_RUN = {"base", "costmodel", "measure", "train", "reliability"}
ALLOWED = {
    "base": set(),
    "costmodel": {"base", "costmodel"},
    "measure": {"base", "costmodel", "measure"},
    "train": {"base", "costmodel", "measure", "train"},
    "reliability": _RUN,
    "collectives": {"base", "costmodel", "measure", "train", "collectives"},
    "harness": _RUN | {"harness"},
    "labs": _RUN | {"collectives", "harness", "labs"},
    "library": _RUN | {"collectives", "harness", "labs", "library"},
    "exercises": _RUN | {"collectives", "harness", "labs", "library", "exercises"},
    "cluster": {"base", "cluster"},
    "commands": _RUN | {"collectives", "cluster", "commands"},
    "incidents": _RUN | {"collectives", "cluster", "commands", "exercises", "incidents"},
    "docsgen": set(ORDER) - {"cli"},
    "cli": set(ORDER),
}
COMMANDS = ("launch", "report", "bench", "doctor", "plan")


def layer(module: str) -> str:
    if module.startswith("labs.library"):
        return "library"
    if module == "labs" or module.startswith("labs."):
        return "labs"
    if module in ("dtlab.errors", "dtlab.registry", "dtlab.plotting"):
        return "base"
    if module == "dtlab.harness":
        return "harness"
    part = module.split(".")[1] if module.startswith("dtlab.") else ""
    if part in COMMANDS:
        return "commands"
    if part in ORDER:
        return part
    return "cli"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.with_suffix("").relative_to(root).parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module an import refers to: ``name`` itself or its longest known parent package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: modules of dtlab and labs it imports}, every import (also inside functions)."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    modules = set(files)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_resolve(a.name, modules) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import name`: the module pkg.name when there is one, else pkg
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else _resolve(node.module, modules) for a in node.names]
            edges[mod].update(t for t in targets if t and t != mod)
    return edges


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in sorted(edges.items()):
        src = layer(mod)
        for t in sorted(targets):
            dst = layer(t)
            if dst not in ALLOWED[src]:
                out.append(f"{mod} ({src}) imports {t} ({dst}); {src} may import "
                           f"{', '.join(sorted(ALLOWED[src])) or 'nothing of dtlab'}")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each a cycle."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges.get(v, ()):
                found.append(sorted(group))

    sys.setrecursionlimit(max(1000, 4 * len(edges)))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer_edges(edges: dict[str, set[str]]) -> Counter:
    return Counter((layer(m), layer(t))
                   for m, ts in edges.items() for t in ts if layer(m) != layer(t))


def _short(module: str) -> str:
    """A module's name inside its layer's box: without the package prefix; the exercise
    skeletons, solutions and checks collapse into one entry each."""
    for prefix in ("dtlab.exercises.", "labs.library.", "labs.", "dtlab."):
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    head = module.split(".")[0]
    return head + "/*" if head in ("skeletons", "solutions", "checks") and "." in module \
        else module


def draw(edges: dict[str, set[str]], path: Path) -> Path:
    """One box per layer (its modules listed inside), bottom to top, and an arrow for every pair
    of layers with imports between them, labelled with how many (red: against the layers)."""
    plt = plt_agg()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # matplotlib: only to draw
    members = defaultdict(list)
    for m in sorted(edges):
        name = _short(m)
        if name not in members[layer(m)]:
            members[layer(m)].append(name)
    pos = {"base": (0.14, 0.05), "costmodel": (0.45, 0.05), "cluster": (0.82, 0.05),
           "measure": (0.30, 0.19), "train": (0.30, 0.33),
           "reliability": (0.13, 0.48), "collectives": (0.43, 0.48), "harness": (0.70, 0.48),
           "labs": (0.30, 0.63), "library": (0.72, 0.63),
           "exercises": (0.16, 0.79), "commands": (0.55, 0.79), "incidents": (0.885, 0.79),
           "docsgen": (0.35, 0.94), "cli": (0.80, 0.94)}
    width = {"base": 0.22, "costmodel": 0.34, "cluster": 0.22, "measure": 0.50, "train": 0.56,
             "reliability": 0.24, "collectives": 0.30, "harness": 0.18, "labs": 0.56,
             "library": 0.24, "exercises": 0.26, "commands": 0.44, "incidents": 0.2,
             "docsgen": 0.62, "cli": 0.22}
    colours = {"base": "#eeeeee", "costmodel": "#e3f2e1", "cluster": "#d8f0ec",
               "measure": "#dbe9f6", "train": "#cfe0f3", "reliability": "#f6e0db",
               "collectives": "#dff0d8", "harness": "#e6e6fa", "labs": "#fcf3cf",
               "library": "#fdebd0", "exercises": "#f5e1f7", "commands": "#e8e0f5",
               "incidents": "#fde2e4",
               "docsgen": "#f0f0d8", "cli": "#f2dede"}
    fig, ax = plt.subplots(figsize=(14, 11))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.04)
    ax.axis("off")
    boxes = {}
    for name, (x, y) in pos.items():
        mods, w = members.get(name, []), width[name]
        per_line = max(8, int(w * 150))  # characters of module names a line holds
        lines, line = [], ""
        for m in mods:
            if line and len(line) + len(m) + 2 > per_line:
                lines.append(line)
                line = ""
            line = f"{line}, {m}" if line else m
        lines.append(line)
        h = 0.045 + 0.015 * len(lines)
        boxes[name] = (x, y, w, h)
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.008",
                                    fc=colours[name], ec="#555555", zorder=2))
        ax.text(x, y + h / 2 - 0.022, name, ha="center", va="center", fontsize=10,
                weight="bold", zorder=3)
        ax.text(x, y - 0.012, "\n".join(lines), ha="center", va="center", fontsize=7.5,
                zorder=3)
    for (src, dst), n in sorted(layer_edges(edges).items()):
        (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[src], boxes[dst]
        # leave from the side of the box that faces the target, a little towards it
        sx = x1 + max(-w1 / 3, min(w1 / 3, (x2 - x1) / 2))
        ex = x2 + max(-w2 / 3, min(w2 / 3, (x1 - x2) / 2))
        start = (sx, y1 - h1 / 2) if y1 > y2 else (sx, y1 + h1 / 2)
        end = (ex, y2 + h2 / 2) if y1 > y2 else (ex, y2 - h2 / 2)
        bad = dst not in ALLOWED[src]
        colour = "red" if bad else "#555555"
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12,
                                     color=colour, lw=0.8 + 0.08 * n, alpha=0.75, zorder=1))
        t = 0.5
        ax.text(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]), str(n),
                fontsize=8, color=colour, ha="center", va="center", zorder=1,
                bbox=dict(fc="white", ec=colour, alpha=0.9, pad=1.0, boxstyle="round"))
    n_mod = len(edges)
    n_edge = sum(len(t) for t in edges.values())
    ax.set_title(f"dtlab's import graph, read from the source: {n_mod} modules, {n_edge} "
                 "imports between them.\nArrows point from the importer to the imported layer, "
                 "labelled with the number of imports; a red one would break the layers "
                 "(dtlab/docsgen/import_graph.py).", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_parser():
    p = argparse.ArgumentParser(prog="python -m dtlab.docsgen.import_graph",
                                description=__doc__.splitlines()[0])
    p.add_argument("--png", default=None, help="draw the layer picture into this file")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    edges = graph()
    for m in sorted(edges):
        if edges[m]:
            print(f"{m} -> {', '.join(sorted(edges[m]))}")
    bad, loops = violations(edges), cycles(edges)
    for line in bad:
        print(f"against the layers: {line}")
    for loop in loops:
        print(f"cycle: {' <-> '.join(loop)}")
    if args.png:
        print(f"picture: {draw(edges, Path(args.png))}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(bad)} against "
          f"the layers, {len(loops)} cycles")
    return 1 if bad or loops else 0


if __name__ == "__main__":
    sys.exit(main())
