"""The package's folders are its layers, and dependencies point only down.

The order, lowest first: ``tasks`` (pure Python), ``functional`` and ``losses`` (torch only),
``data``, ``models``, ``generation``, ``training``, ``modules``, ``callbacks``, ``labelling``
(``prefl pairs`` and ``prefl label``), then the entry points at the top (``cli``,
``lightning_cli``, ``pipeline``, ``toy``, ``__init__``, ``__main__``). A module may
import its own layer and the layers below it, never one above; and no module below the top imports
prefl inside a function, the usual way to hide a cycle (the entry points import lazily so that
``--help`` answers at once; nothing imports them, so no cycle can hide there). The check parses
the files (``ast``), so it sees imports that a test run never executes.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prefl"
LAYERS = [
    "tasks",
    "functional",
    "losses",
    "data",
    "models",
    "generation",
    "training",
    "modules",
    "callbacks",
    "labelling",
    "top",
]
#: third-party packages a layer may import (None = any); the standard library is always allowed
THIRD_PARTY = {"tasks": set(), "functional": {"torch"}, "losses": {"torch"}}


def layer_of(module: str) -> str:
    """The layer of a dotted ``prefl...`` module name (or of a file's module name)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in LAYERS[:-1] else "top"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a (possibly relative) ``from ... import``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, imported module, inside a function)`` of every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module, is_package = module_name(path), path.name == "__init__.py"
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child, module, is_package)
                found.append((child.lineno, target, nested))
                if target == "prefl":  # `from prefl import data`: each name is a module
                    found.extend((child.lineno, f"prefl.{a.name}", nested) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    """One line per import that breaks the layering, naming file, line and rule."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        here = layer_of(module_name(path)) if path.parent != package else "top"
        rank = LAYERS.index(here)
        where = f"{path.relative_to(package.parent)}"
        for line, target, nested in imports(path):
            top = target.split(".")[0]
            if top == "prefl" and target != "prefl":
                there = layer_of(target)
                if LAYERS.index(there) > rank:
                    problems.append(f"{where}:{line}: {here} imports {target} ({there}, above)")
                if nested and here != "top":
                    problems.append(f"{where}:{line}: imports {target} inside a function")
            elif top == "prefl" and here != "top":
                problems.append(f"{where}:{line}: imports the top-level package prefl")
            elif top not in sys.stdlib_module_names and top != "__future__":
                allowed = THIRD_PARTY.get(here)
                if allowed is not None and top not in allowed:
                    problems.append(f"{where}:{line}: {here} imports {top} (allowed: {allowed})")
    return problems


def test_dependencies_point_only_down():
    problems = violations()
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS[:-1])


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"data/x.py": "from prefl.models import y\n"},
            ["prefl/data/x.py:1: data imports prefl.models (models, above)"],
        ),
        (
            {"losses/x.py": "import torch\nimport transformers\n"},
            ["prefl/losses/x.py:2: losses imports transformers (allowed: {'torch'})"],
        ),
        (
            {"models/x.py": "def f():\n    from prefl.data import y\n"},
            ["prefl/models/x.py:2: imports prefl.data inside a function"],
        ),
        (
            {"modules/x.py": "from . import y\nfrom ..callbacks import z\n"},
            ["prefl/modules/x.py:2: modules imports prefl.callbacks (callbacks, above)"],
        ),
        ({"modules/x.py": "from prefl.training.guard import g\nimport lightning\n"}, []),
    ],
)
def test_violations_name_file_line_and_rule(tmp_path, files, expected):
    package = tmp_path / "prefl"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    global PACKAGE
    saved, PACKAGE = PACKAGE, package
    try:
        assert violations(package) == expected
    finally:
        PACKAGE = saved
