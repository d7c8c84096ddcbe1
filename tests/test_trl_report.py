"""``benchmarks/trl_report.py``: worker command lines (no TRL needed)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_worker_argv_forwards_options_and_boolean_flags_only_when_set(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import trl_report

    parser = trl_report.base_parser("x", steps=5, batch=2, lr=1e-3)
    script, workdir = Path("bench.py"), Path("/tmp/w")
    off = trl_report.worker_argv(script, "prefl", parser.parse_args([]), workdir)
    on = trl_report.worker_argv(
        script, "prefl", parser.parse_args(["--group-by-length", "--repeats", "7"]), workdir
    )
    assert off[:6] == [sys.executable, "bench.py", "--worker", "prefl", "--workdir", "/tmp/w"]
    assert "--group-by-length" not in off and "False" not in off
    assert on == [*off, "--group-by-length"]  # a bare flag; --repeats stays with the parent
    assert parser.parse_args(on[2:]).group_by_length is True
