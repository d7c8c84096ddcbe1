"""Smoke run of benchmarks/memory_options.py (``--tiny``): two of its configurations, each in its
own subprocess, on a 2-layer, 64-wide Llama; checks the printed table and the JSON's shape, and
that each option was in effect (LoRA: adapters and no reference copy)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_memory_options_tiny_smoke_run(tmp_path):
    out = tmp_path / "memory_options.json"
    args = ["--tiny", "--configs", "dpo_baseline", "dpo_lora", "--steps", "2", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/memory_options.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "| configuration | peak RSS MiB |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["config"]["size_name"] == "tiny"
    assert report["config"]["steps"] == 2 and report["config"]["params"] > 0
    assert [r["config"] for r in report["summary"]] == ["dpo_baseline", "dpo_lora"]
    assert [r["config"] for r in report["runs"]] == ["dpo_baseline", "dpo_lora"]
    for run in report["runs"]:
        assert "error" not in run, run
        assert run["steps"] == 2
        assert 0 < run["rss_before_fit_mib"] < run["peak_rss_mib"]
        assert run["delta_rss_mib"] == pytest.approx(
            run["peak_rss_mib"] - run["rss_before_fit_mib"]
        )
        assert run["step_s"] > 0
        assert run["cuda_peak_mib"] is None  # CPU run: no CUDA counter
    base, lora = report["summary"]
    assert base["delta_x_base"] == pytest.approx(1.0)
    assert lora["delta_x_base"] > 0
    assert base["checks"]["reference_copy"] and not base["checks"]["lora"]
    assert lora["checks"]["lora"] and not lora["checks"]["reference_copy"]
    assert lora["checks"]["trainable_params"] < base["checks"]["trainable_params"]
