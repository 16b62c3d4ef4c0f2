"""No import circle among soupjax's modules: the graph of their `import` statements, read with `ast`
(nothing is imported), has no cycle, counting the imports inside functions as well.

An edge A -> B is an import of soupjax module B written in A: `import soupjax.b`, `from soupjax import b`
(B a module or package), `from soupjax.b import name` (B itself). Imports under `if TYPE_CHECKING:` never
run and are left out. Both the imports run when a module is imported (module level, class bodies
included) and those inside functions (run later, but they still tie the two modules together) are
checked; ``python tests/test_import_graph.py`` prints any circle of either kind.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "soupjax"


def module_names() -> dict[str, Path]:
    """Every soupjax module by dotted name (a package by its own name, for its __init__.py)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, in_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run: at module level (and in class bodies), or anywhere."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:  # the else branch runs
                    visit(ast.Module(body=[other], type_ignores=[]))
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not in_functions:
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """module -> the soupjax modules it imports."""
    names = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        targets: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path)), in_functions):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in names:
                    targets.add(f"{base}.{alias.name}")  # from package import module
                elif base in names:
                    targets.add(base)  # from module import name
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path A -> ... -> A inside one strongly connected component, for the message."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        following = sorted(t for t in graph[path[-1]] if t in component)
        if start in following and len(path) > 1:
            return path + [start]
        step = next((t for t in following if t not in seen), following[0])
        if step in seen:
            return path[path.index(step):] + [step]
        path.append(step)
        seen.add(step)


def test_the_graph_is_read():
    graph = import_graph()
    # A few edges that exist, so that an empty graph cannot pass.
    assert "soupjax.models.registry" in graph["soupjax.models.from_config"]
    assert "soupjax.importers.sources" in graph["soupjax.importers.dispatch"]
    assert "soupjax.models" in graph["soupjax.importers.activation"]


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_soupjax_modules():
    # Imports inside functions count too: the circle this test was written for (models -> from_config ->
    # importers.pretrained -> models) was one, hidden in build_model.
    for in_functions in (False, True):
        found = cycles(import_graph(in_functions))
        assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


if __name__ == "__main__":
    for in_functions in (False, True):
        found = cycles(import_graph(in_functions))
        where = "module level and inside functions" if in_functions else "module level"
        print(f"{where}: {len(found)} circle(s)")
        for cycle in found:
            print("   ", " -> ".join(cycle))
