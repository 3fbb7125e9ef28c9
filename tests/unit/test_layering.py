"""fxtap's modules import downwards only, and never in a cycle (docs/architecture.md).

Layers, lowest first: ``_errors``/``_values``/``_text``; the engine ``_capture``; the façade
``_tap``; the tools built on it (``_compare``, ``_deploy``, ``_features``, ...); the package
``fxtap``; the command line ``fxtap.cli``. A module may import its own layer or lower ones.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fxtap"

LAYERS: list[tuple[str, ...]] = [
    ("fxtap._errors", "fxtap._values", "fxtap._text"),
    ("fxtap._capture",),
    ("fxtap._tap",),
    ("fxtap._compare", "fxtap._deploy", "fxtap._features", "fxtap._edit", "fxtap._cut", "fxtap._surgery", "fxtap._extract", "fxtap._shards", "fxtap._pool", "fxtap._ranks"),
    ("fxtap",),
    ("fxtap.cli", "fxtap.__main__"),
]


def layer_of(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), index)
    if best[1] < 0:
        raise AssertionError(f"module {module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return best[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> set[str]:
    """The fxtap modules that ``path`` imports (relative imports resolved; ``from . import x`` is module ``x``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "fxtap"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "fxtap":
                continue
            modules = {f"{base}.{alias.name}" for alias in node.names}
            existing = {m for m in modules if _is_module(m, root)}
            found |= existing or {base}
            if existing != modules:
                found.add(base)
    found.discard(name)
    return found


def _is_module(module: str, root: Path) -> bool:
    relative = Path(*module.split(".")[1:])
    return (root / relative).with_suffix(".py").is_file() or (root / relative / "__init__.py").is_file()


def problems(root: Path) -> list[str]:
    graph = {module_name(p, root): imports(p, root) for p in sorted(root.rglob("*.py"))}
    found = []
    for module, targets in graph.items():
        for target in sorted(targets):
            if target in graph and layer_of(target) > layer_of(module):
                found.append(f"upward import: {module} imports {target}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (a package importing its own
    submodules is not a cycle unless they import it back)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_layering_imports_point_down_and_never_cycle() -> None:
    assert problems(PACKAGE) == []


@pytest.mark.parametrize(
    ("file", "line", "expected"),
    [
        ("_capture/fx.py", "from .._tap import tap\n", "upward import: fxtap._capture.fx imports fxtap._tap"),
        ("_tap.py", "from ._deploy import export\n", "upward import: fxtap._tap imports fxtap._deploy.export"),
        ("_capture/names.py", "from . import regions\n", "import cycle"),
    ],
)
def test_layering_check_fails_on_a_planted_import(tmp_path: Path, file: str, line: str, expected: str) -> None:
    root = tmp_path / "fxtap"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / file
    target.write_text(line + target.read_text())
    assert any(p.startswith(expected) for p in problems(root)), problems(root)
