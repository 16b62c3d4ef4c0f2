"""The house rules of soupjax's layout, checked on the source itself (no import of soupjax needed):
no module over 600 lines, no function over 80 lines (its docstring aside) without a ``# Long:`` comment saying why,
no module that imports another module's private name, and a top level of entry points only. (No import
circle: tests/test_import_graph.py.)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "soupjax"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# A long function names the reason in a comment in its first lines, starting with this marker.
LONG_FUNCTION_MARKER = "# Long:"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported soupjax module, imported name or None, line) for every import in ``module``, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("soupjax")]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not source.startswith("soupjax"):
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                out.append((child, None, node.lineno) if child in MODULES else (source, alias.name, node.lineno))
    return out


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_long_functions_say_why():
    unexplained = []
    for name, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # The docstring does not count: explaining a function is never what makes it too long.
                body = node.body
                doc = body[0] if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str) else None
                length = node.end_lineno - node.lineno + 1 - (doc.end_lineno - doc.lineno + 1 if doc else 0)
                text = "\n".join(lines[node.lineno - 1: node.end_lineno])
                if length > MAX_FUNCTION_LINES and LONG_FUNCTION_MARKER not in text:
                    unexplained.append(f"{name}.{node.name} ({length} lines)")
    assert not unexplained, (f"functions over {MAX_FUNCTION_LINES} lines (docstring aside) without a "
                             f"'{LONG_FUNCTION_MARKER} ...' comment: {unexplained}")


def test_no_module_imports_a_private_name_of_another():
    private = [f"{name}:{line} imports {source}.{imported}" for name in MODULES
               for source, imported, line in _imports(name)
               if imported and imported.startswith("_") and source != name]
    private += [f"{name}:{line} imports the private module {source}" for name in MODULES
                for source, _, line in _imports(name) if any(p.startswith("_") and p != "__init__"
                                                              for p in source.split("."))]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("top_level_allowed", [("api", "finetune", "soup", "experiment", "inspect_soup",
                                               "import_ingredients", "__init__")])
def test_the_top_level_holds_only_entry_points(top_level_allowed):
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert set(top) <= set(top_level_allowed), f"modules at soupjax/'s top level that are not entry points: {top}"
