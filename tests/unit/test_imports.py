"""Imports run one way (DESIGN.md): no module of ostinato imports itself through others, and the
product (train/, fleet/) never imports the fault-injection scaffolding (faults/).

The graph is read from the source with ast, every import counted: at module level, inside
functions (a deferred import is still a dependency), and under TYPE_CHECKING (a cycle that only
the type checker sees is still a cycle in the design).
"""

import ast
from pathlib import Path

import pytest

import ostinato

pytestmark = pytest.mark.timeout(30)
ROOT = Path(ostinato.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The ostinato modules an import statement names (`from a import b` names a.b when b is
    a module, else a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    names = [f"{source}.{alias.name}" for alias in node.names]
    return [name for name in names if name in known] or [source]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the ostinato modules it imports}, for every module under `root`."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(tree):
            for name in imported(node, module, is_package, known):
                if name in known and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    """The checker itself can fail: a three-module loop is found, a chain and a diamond not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []


def test_the_graph_sees_imports_inside_functions_and_under_type_checking(tmp_path):
    package = tmp_path / "ostinato"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ostinato.b import X\n"
    )
    (package / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    graph = import_graph(package)
    assert graph["ostinato.a"] == {"ostinato.b"} and graph["ostinato.b"] == {"ostinato.a"}
    assert cycles(graph) == [["ostinato.a", "ostinato.b"]]


def test_no_module_of_ostinato_imports_itself_through_others():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_neither_train_nor_fleet_imports_faults():
    graph = import_graph()
    product = ("ostinato.train", "ostinato.fleet")
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith(product)
        for target in targets
        if target == "ostinato.faults" or target.startswith("ostinato.faults.")
    )
    assert graph["ostinato.faults.chaos"] >= {"ostinato.fleet.local"}  # the allowed direction
    assert not wrong, wrong
