"""Smoke tests of the prefl-vs-TRL benchmarks (``benchmarks/*_vs_trl.py``): each script's ``main``
runs both libraries once on a few steps and writes a JSON report with both sides' numbers.
Skipped where TRL is not installed (CI does not install the ``bench`` extra)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--steps", "3", "--warmup", "1", "--batch", "2", "--repeats", "1", "--threads", "1"]


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("dpo_vs_trl", []),
        ("reward_vs_trl", ["--group-by-length"]),
        ("rloo_vs_trl", ["--num-generations", "2", "--max-new-tokens", "4"]),
    ],
)
def test_benchmark_reports_both_libraries(
    script: str, extra: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    out = tmp_path / f"{script}.json"
    module.main([*TINY, *extra, "--json", str(out)])

    report = json.loads(out.read_text())
    assert report["name"] == script
    assert [r["lib"] for r in report["runs"]] == ["prefl", "trl"]
    for run in report["runs"]:
        assert run["steps"] == 3 and run["timed_steps"] == 2
        assert run["throughput"] > 0 and run["peak_rss_mib"] > 0
        assert run["torch_threads"] == 1 and run["dtype"] == "torch.float32"
        # each worker imports only its own library
        assert run["imported"]["trl"] == (run["lib"] == "trl")
        assert run["imported"]["lightning"] == (run["lib"] == "prefl")
    summary = report["summary"]
    for lib in ("prefl", "trl"):
        assert summary[lib]["throughput"] > 0 and summary[lib]["peak_rss_mib"] > 0
    assert summary["ratio_throughput"] > 0 and summary["ratio_peak_rss"] > 0
    assert report["machine"]["versions"]["trl"] and report["machine"]["cpu_count"]
    if script == "rloo_vs_trl":  # same completion length on both sides
        assert summary["prefl"]["mean_completion_tokens"] <= 4
        assert summary["trl"]["mean_completion_tokens"] <= 4
