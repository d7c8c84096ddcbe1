"""Every import in the repository is the standard library, the project, or a declared distribution.

The check reads the files and ``pyproject.toml`` only (``ast`` and ``tomllib``), so it does not
depend on what happens to be installed: a package that a hand-installed environment hides from the
other tests still fails here. Each folder may use the core dependencies plus its own extras:

- ``prefl/``: core, plus the optional features ``peft``, ``deepspeed``, ``real`` and ``label``
  (imported where used);
- ``notebooks/``: core only (the README's first command is all a notebook reader installs);
- ``tests/``: core plus ``dev`` (the README's test command);
- ``benchmarks/``: core plus ``bench``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dev extra installs tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "prefl"
# folder -> the extras its files may draw on, beside the core dependencies
SCOPES: dict[str, tuple[str, ...]] = {
    "prefl": ("peft", "deepspeed", "real", "label"),
    "notebooks": (),
    "tests": ("dev",),
    "benchmarks": ("bench",),
}
# folder -> other folders whose modules its files import by putting them on ``sys.path``
SEES: dict[str, tuple[str, ...]] = {"tests": ("benchmarks",)}
# import name -> distribution name, where the two differ by more than `_` against `-`
DISTRIBUTION_OF = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "google": "protobuf",
    "dateutil": "python-dateutil",
    "lightning_utilities": "lightning-utilities",
}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def normalize(name: str) -> str:
    """PEP 503 form of a distribution name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path, extras: tuple[str, ...]) -> set[str]:
    """Normalised names of the core dependencies plus ``extras`` of ``pyproject``; an extra that
    names the project itself (``prefl[peft]``) brings in that extra's requirements too."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    names: set[str] = set()
    todo, seen = [None, *extras], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra is not None and extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r}")
        for req in project.get("dependencies", []) if extra is None else optional[extra]:
            match = _REQUIREMENT.match(req)
            name = normalize(match.group(1))
            if name == normalize(project["name"]):
                todo.extend(e.strip() for e in (match.group(2) or "").split(",") if e.strip())
            else:
                names.add(name)
    return names


def sources(path: Path) -> str:
    """The Python text of ``path``: a ``.py`` file as is, a notebook's code cells joined (lines
    starting with ``%`` or ``!`` are IPython magics, not Python)."""
    if path.suffix != ".ipynb":
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            text = "".join(cell["source"])
            lines += [ln for ln in text.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            lines.append("")
    return "\n".join(lines)


def imports(text: str) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of every absolute import in ``text``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return sorted(found)


def local_modules(folder: Path) -> set[str]:
    """Names a file in ``folder`` can import from beside itself: its ``.py`` stems and packages."""
    return {p.stem for p in folder.rglob("*.py")} | {
        p.name for p in folder.rglob("*") if p.is_dir()
    }


def undeclared(root: Path) -> list[str]:
    """One line per import under ``root``'s scoped folders that ``pyproject.toml`` does not
    declare for that folder: ``file:line: import `x` needs distribution `y` (declared for
    folder/: ...)``."""
    problems = []
    for folder, extras in SCOPES.items():
        base = root / folder
        if not base.is_dir():
            continue
        allowed = declared(root / "pyproject.toml", extras)
        local = local_modules(base) | {PROJECT, "__future__"}
        for other in SEES.get(folder, ()):
            if (root / other).is_dir():
                local |= local_modules(root / other)
        where = ", ".join(["core", *extras])
        for path in sorted(p for p in base.rglob("*") if p.suffix in (".py", ".ipynb")):
            if ".ipynb_checkpoints" in path.parts:
                continue
            for line, module in imports(sources(path)):
                if module in sys.stdlib_module_names or module in local:
                    continue
                dist = normalize(DISTRIBUTION_OF.get(module, module))
                if dist not in allowed:
                    problems.append(
                        f"{path.relative_to(root)}:{line}: import `{module}` needs distribution "
                        f"`{dist}`, which pyproject.toml does not declare for {folder}/ "
                        f"(allowed there: {where})"
                    )
    return problems


def test_every_import_is_declared_for_its_folder():
    problems = undeclared(ROOT)
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_the_scoped_folders_exist():
    """A renamed folder must not turn the check above into one that cannot fail."""
    assert all((ROOT / folder).is_dir() for folder in SCOPES)
    assert len(list((ROOT / "prefl").rglob("*.py"))) > 20


def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "prefl"\ndependencies = ["torch>=2.4", "PyYAML>=6"]\n'
        "[project.optional-dependencies]\n"
        'peft = ["peft>=0.13"]\ndeepspeed = []\nreal = []\nlabel = []\n'
        'dev = ["prefl[peft]", "pytest>=8"]\nbench = []\n',
        encoding="utf-8",
    )
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_an_undeclared_import_is_named_with_file_line_and_distribution(tmp_path):
    root = _project(
        tmp_path,
        {
            "prefl/core.py": "import os\nimport torch\nfrom . import sibling\n\n"
            "def f():\n    import matplotlib.pyplot as plt\n",
            "tests/test_x.py": "import pytest, yaml\nimport peft\nimport helper\nimport pandas\n",
            "tests/helper.py": "",
            "tests/test_bench.py": "import bench_script\nimport other\n",
            "benchmarks/bench_script.py": "",
        },
    )
    assert undeclared(root) == [
        "prefl/core.py:6: import `matplotlib` needs distribution `matplotlib`, which "
        "pyproject.toml does not declare for prefl/ (allowed there: core, peft, deepspeed, real, "
        "label)",
        "tests/test_bench.py:2: import `other` needs distribution `other`, which "
        "pyproject.toml does not declare for tests/ (allowed there: core, dev)",
        "tests/test_x.py:4: import `pandas` needs distribution `pandas`, which "
        "pyproject.toml does not declare for tests/ (allowed there: core, dev)",
    ]


def test_an_extra_is_not_visible_outside_its_folder(tmp_path):
    """``peft`` is declared for tests/ (through ``prefl[peft]`` in dev) but not for notebooks/."""
    notebook = {"cells": [{"cell_type": "code", "source": ["%pip install x\n", "import peft\n"]}]}
    root = _project(
        tmp_path, {"notebooks/n.ipynb": json.dumps(notebook), "tests/t.py": "import peft"}
    )
    assert undeclared(root) == [
        "notebooks/n.ipynb:1: import `peft` needs distribution `peft`, which pyproject.toml "
        "does not declare for notebooks/ (allowed there: core)"
    ]


@pytest.mark.parametrize(
    ("extras", "expected"),
    [((), {"torch", "pyyaml"}), (("dev",), {"torch", "pyyaml", "peft", "pytest"})],
)
def test_declared_resolves_self_referencing_extras(tmp_path, extras, expected):
    root = _project(tmp_path, {})
    assert declared(root / "pyproject.toml", extras) == expected
