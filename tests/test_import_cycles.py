"""No import cycle among the modules of mi_tune, read from the source with the standard library's ``ast``:
every import statement at any level (module, class, function bodies), relative (``from .x import y``,
``from . import x``) and absolute (``import mi_tune.x``, ``from mi_tune.x import y``). And ``log`` prints
without torch."""

import ast
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "mi_tune"


def module_name(path: Path) -> str:
    """``mi_tune/eval/probe.py`` -> ``mi_tune.eval.probe``; ``mi_tune/eval/__init__.py`` -> ``mi_tune.eval``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, name: str) -> set[str]:
    """Dotted names each import statement of the file may load: ``from A import b`` gives ``A.b`` and ``A``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 = this package, 2 = its parent, ...
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the mi_tune modules it imports (``from A import b``: module ``A.b`` if there is one, else ``A``)."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in imported_names(path, name):
            if target in files:
                deps.add(target)
            elif target.rpartition(".")[0] in files:  # from A import some_name (not a module): A itself
                deps.add(target.rpartition(".")[0])
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "mi_tune.eval.tasks.classification" in graph and "mi_tune" in graph
    assert "mi_tune.config" in graph["mi_tune.train"]  # module level, relative
    assert "mi_tune.loading" in graph["mi_tune.mlflow_model"]  # inside a function (_load_pyfunc)
    assert "mi_tune.eval.cache" in graph["mi_tune.eval.probe"]  # inside a function, same package
    assert "mi_tune.tracking" in graph["mi_tune.eval.probe"]  # two levels up (from ..tracking import ...)
    assert "mi_tune.eval.tasks.sts" in graph["mi_tune.eval.downstream"]  # from .tasks import sts: the submodule
    assert "mi_tune.eval.tasks" in graph["mi_tune.eval.tasks.sts"]  # from . import TaskSpec: the package
    assert "mi_tune" in graph["mi_tune.mlflow_model"]  # from . import __version__


def test_no_import_cycle_among_mi_tune_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_log_prints_without_torch():
    code = ("import sys; from mi_tune.errors import log; import mi_tune.redaction; log('hello'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.splitlines()[-1:] == ["[mi_tune] hello"], proc.stderr
    from mi_tune import errors, modeling

    assert modeling.log is errors.log  # older imports (from .modeling import log) still work


def test_readme_file_tree_names_every_module():
    """The README's file tree is complete: every module of mi_tune/ (and of mi_tune/eval/) is named in it."""
    readme = (ROOT / "README.md").read_text()
    tree = readme[readme.index("## Files"):]
    tree = tree[: tree.index("\n## ", 1)]
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.glob("*.py")) + sorted((PACKAGE / "eval").glob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and p.name not in tree]
    assert not missing, f"README ## Files does not name: {missing}"
