"""The package's shape: every module imports, no import cycle, modules a reader can take in one sitting.

The import graph counts every `import` statement, inside functions too (a function-level import
hides a cycle from the interpreter, not from a reader), except those under `if TYPE_CHECKING:`.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "equivcheck"
MAX_LINES = 420  # the layout issue's "~400 lines"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, modules: dict[str, Path], here: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("equivcheck"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("equivcheck"):
            for a in node.names:  # `from pkg import submodule` is an edge to the submodule
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(here)
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(ast.parse(path.read_text()), modules, name) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_inside_the_package():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_planted_cycle():
    edges = graph()
    edges["equivcheck.engine.compare"] = edges["equivcheck.engine.compare"] | {"equivcheck.ops.runner"}
    assert any("equivcheck.engine.compare" in c and "equivcheck.ops.runner" in c for c in cycles(edges))


def test_the_engine_depends_on_no_check_kind():
    kinds = ("equivcheck.ops", "equivcheck.models", "equivcheck.optim", "equivcheck.data", "equivcheck.report")
    bad = {m: sorted(d for d in deps if d.startswith(kinds))
           for m, deps in graph().items() if m.startswith("equivcheck.engine")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_modules_are_readable_in_one_sitting():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_subpackage_says_what_lives_there_and_re_exports_explicitly():
    for path in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path} has no docstring"
        if path.parent != PACKAGE:
            assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
                       for n in tree.body), f"{path} has no __all__"


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in sorted(_modules()) if not n.endswith("__main__")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_import_the_readme_shows_works():
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    lines = sorted({ln.split("#")[0].strip() for block in re.findall(r"```python\n(.*?)```", readme, re.S)
                    for ln in block.splitlines() if ln.startswith(("from equivcheck", "import equivcheck"))})
    assert lines, "the README shows no import"
    proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
