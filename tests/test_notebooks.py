"""The notebooks under notebooks/: each runs offline as a script with small settings and writes
its plots, and each paired .ipynb matches its jupytext percent-format .py and has no outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
#: Notebook name -> the PNG files it must write under PREFL_NB_OUT.
NOTEBOOKS = {
    "quickstart": ["quickstart_implicit_rewards.png"],
    "rlhf": ["rlhf_curves.png"],
    "frontier": ["frontier.png"],
}


def _cells(path: Path) -> list[tuple[str, str]]:
    import jupytext

    notebook = jupytext.read(path)
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.py")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_ipynb_in_sync_with_py_and_without_outputs(name):
    py, ipynb = NOTEBOOKS_DIR / f"{name}.py", NOTEBOOKS_DIR / f"{name}.ipynb"
    assert ipynb.is_file(), f"{ipynb.name} missing: run `jupytext --to ipynb notebooks/{name}.py`"
    cells = _cells(py)
    assert cells, f"{py.name} has no cells"
    assert _cells(ipynb) == cells, (
        f"{ipynb.name} is out of sync with {py.name}: run `jupytext --to ipynb notebooks/{name}.py`"
    )
    raw = json.loads(ipynb.read_text(encoding="utf-8"))
    for i, cell in enumerate(raw["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{ipynb.name} cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{ipynb.name} cell {i} was executed"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_small(name, tmp_path):
    env = {
        **os.environ,
        "PREFL_NB_SMALL": "1",
        "PREFL_NB_OUT": str(tmp_path),
        "MPLBACKEND": "Agg",
        # One intra-op thread: the toy models are tiny, and two-thread OpenMP pools thrash
        # (runs 10x slower) whenever another process also uses the 2 cores.
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(NOTEBOOKS_DIR / f"{name}.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{name}.py exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-4000:]}"
    )
    for png in NOTEBOOKS[name]:
        path = tmp_path / png
        assert path.is_file(), f"{name}.py did not write {png}"
        assert path.stat().st_size > 0, f"{name}.py wrote an empty {png}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
