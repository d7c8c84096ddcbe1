"""benchmarks/smollm2_layouts.py: its rates and summary, on hand-made runs (the runs themselves
need the GGUF model and minutes of CPU: the script is the benchmark)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import smollm2_layouts as bench  # noqa: E402


def run(layout: str, walls: list[float], data: int, real: int, computed: int, rss: float):
    tokens = [{"data": data, "real": real, "computed": computed}] * len(walls)
    cpu = [2 * w for w in walls]
    return {"layout": layout, "step_wall_s": walls, "step_cpu_s": cpu, "tokens": tokens,
            "peak_rss_mib": rss}  # fmt: skip


def test_rates_leave_out_the_first_step():
    """Steps of 9, 2 and 4 s holding 600 data tokens (400 real of 500 computed): the last two
    give 1200 tokens in 6 s = 200 tokens/s, 100 per CPU second, 20% padding, median step 3 s."""
    got = bench.rates(run("packed_shared", [9.0, 2.0, 4.0], 600, 400, 500, 1.0))
    assert got == pytest.approx(
        {
            "data_tokens_per_s": 200.0,
            "data_tokens_per_cpu_s": 100.0,
            "padding_share": 0.2,
            "median_step_s": 3.0,
        }  # fmt: skip
    )


def test_summary_is_the_median_round_and_the_ratio_to_the_padded_layout():
    runs = [
        run("packed_shared", [1.0, 1.0], 300, 200, 200, 2000.0),  # 300 tok/s
        run("packed_shared", [1.0, 2.0], 300, 200, 200, 3000.0),  # 150 tok/s
        run("padded_grouped", [1.0, 3.0], 300, 300, 400, 5000.0),  # 100 tok/s
    ]
    summary = bench.summarize(runs)
    assert summary["packed_shared"]["data_tokens_per_s"] == pytest.approx(225.0)
    assert summary["packed_shared"]["speed_vs_padded"] == pytest.approx(2.25)
    assert summary["packed_shared"]["rss_vs_padded"] == pytest.approx(0.5)
    assert summary["padded_grouped"]["padding_share"] == pytest.approx(0.25)
    assert summary["padded_grouped"]["speed_vs_padded"] == 1.0
