"""The layout holds: dependencies run one way (the table in dtlab/docsgen/import_graph.py:
costmodel <- measure <- train <- reliability, collectives <- harness <- labs <- library <-
exercises; the command families below docsgen and the CLI, reaching labs only by launching
them), no import cycle, labs keep no mutable module-level state, labs/ holds exactly the labs
`dtlab list` shows and one library/ folder, and no folder of dtlab/ is a flat bag."""
import ast
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from conftest import ROOT
from dtlab import registry
from dtlab.docsgen import import_graph as importgraph

LAB_FILES = sorted((ROOT / "labs").glob("*.py"))


def test_imports_follow_the_layers_and_form_no_cycle():
    edges = importgraph.graph()
    assert importgraph.violations(edges) == []
    assert importgraph.cycles(edges) == []
    # the walker sees real edges (a check over an empty graph would pass vacuously)
    assert {"labs.pipeline", "labs.tensor_parallel"} <= edges["labs.parallel3d"]
    assert "dtlab.collectives.ring" in edges["labs.ddp"]
    assert "dtlab.train.loop" in edges["labs.zero"]
    assert "dtlab.reliability.checkpoint" not in edges["dtlab.train.loop"]  # the loop a learner reads


def test_a_wrong_import_and_a_cycle_are_caught(tmp_path):
    """The checker on a small tree: the cost model importing a command, a lab importing its
    library variant, and two labs importing each other."""
    files = {
        "dtlab/__init__.py": "", "dtlab/costmodel/__init__.py": "", "dtlab/plan/__init__.py": "",
        "dtlab/costmodel/a.py": "def f():\n    from dtlab.plan import b\n",
        "dtlab/plan/b.py": "import dtlab.costmodel.a\n",
        "labs/__init__.py": "", "labs/x.py": "from labs import y\nimport labs.library.v\n",
        "labs/y.py": "import labs.x\n", "labs/library/__init__.py": "", "labs/library/v.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = importgraph.graph(tmp_path)
    assert edges["dtlab.costmodel.a"] == {"dtlab.plan.b"}
    bad = importgraph.violations(edges)
    assert len(bad) == 2
    assert bad[0].startswith("dtlab.costmodel.a (costmodel) imports dtlab.plan.b (commands)")
    assert bad[1].startswith("labs.x (labs) imports labs.library.v (library)")
    assert ["labs.x", "labs.y"] in importgraph.cycles(edges)


def test_no_folder_is_a_flat_bag():
    """At most 12 modules a folder of dtlab/ (the exercises' skeletons, solutions and checks apart:
    one file an exercise), and
    labs/ holds the labs and library/ alone."""
    for folder in [ROOT / "dtlab", *(p for p in (ROOT / "dtlab").rglob("*") if p.is_dir())]:
        if folder.name in ("skeletons", "solutions", "checks", "__pycache__"):
            continue
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{folder.relative_to(ROOT)}: {len(modules)} modules"
    assert sorted(p.name for p in (ROOT / "labs").iterdir() if p.is_dir()
                  and p.name != "__pycache__") == ["library"]


def test_costmodel_needs_nothing_but_the_standard_library():
    """Every module of dtlab.costmodel imports with torch unavailable (the planner and dtlab
    memory run without it)."""
    mods = sorted(p.stem for p in (ROOT / "dtlab/costmodel").glob("*.py") if p.stem != "__init__")
    code = ("import sys; sys.modules['torch'] = None\n"
            + "".join(f"import dtlab.costmodel.{m}\n" for m in mods))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and len(mods) >= 4, p.stderr[-2000:]


MUTABLE_NODES = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "local",
                 "bytearray", "deque"}


def _module_state_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    problems = [f"{path.name}:{n.lineno} uses `global`" for n in ast.walk(tree)
                if isinstance(n, (ast.Global, ast.Nonlocal))]
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            v = node.value
            call = isinstance(v, ast.Call) and getattr(v.func, "id", getattr(v.func, "attr", None))
            if isinstance(v, MUTABLE_NODES) or call in MUTABLE_CALLS:
                problems.append(f"{path.name}:{node.lineno} binds a mutable value at module level")
    return problems


@pytest.mark.parametrize("path", LAB_FILES, ids=lambda p: p.name)
def test_labs_keep_no_mutable_module_state(path):
    assert _module_state_problems(path) == []
    # and at run time: what the module defines itself is immutable once imported
    mod = __import__(f"labs.{path.stem}", fromlist=["_"])
    own = {t.id for n in ast.parse(path.read_text()).body if isinstance(n, ast.Assign)
           for t in n.targets if isinstance(t, ast.Name)}
    for name in own:
        value = getattr(mod, name)
        assert not isinstance(value, (dict, list, set, bytearray)) or \
            isinstance(value, types.MappingProxyType), f"labs.{path.stem}.{name}"


def test_the_state_check_catches_a_global(tmp_path):
    f = tmp_path / "bad_lab.py"
    f.write_text(textwrap.dedent("""
        COUNTER = None
        CACHE = {}
        def build(c):
            global COUNTER
            COUNTER = c
    """))
    problems = _module_state_problems(f)
    assert any("uses `global`" in p for p in problems)
    assert any(":3 binds a mutable value" in p for p in problems)


def test_labs_folder_is_the_registry():
    names = subprocess.run([sys.executable, "-m", "dtlab", "list", "--names"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert names == list(registry.LABS)
    assert sorted(p.stem for p in LAB_FILES if p.stem != "__init__") == sorted(names)
    # every library variant the registry names is a file of labs/library/ and imports
    for lab in registry.LABS.values():
        for impl, spec in lab.library:
            assert spec.startswith("labs.library."), (lab.name, impl)
            assert (ROOT / (spec.split(":")[0].replace(".", "/") + ".py")).is_file(), spec


def test_cli_parser_builds_without_torch():
    """`dtlab list`, `dtlab cluster ...` and the doctor run with a Python that has no torch (the
    CI's and Slurm's system python3 tear clusters down with it): building the parser must not
    import torch."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from dtlab.cli import make_parser; make_parser()\n"
            "import dtlab.plan.memory_estimate, dtlab.registry")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
