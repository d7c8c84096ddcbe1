"""CPU smoke run of benchmarks/gpu_check.py (``--device cpu --tiny``): DPO, reward model and
PPO each train a few steps of a 2-layer Llama in bf16 under ModelParallelStrategy (gloo, one
process), with prefl's FSDP2 sharding applied, and the script writes its tables and JSON.

The script runs in a subprocess, so its process group does not leak into the test session.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_gpu_check_cpu_smoke_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--tiny", "--steps", "3", "--warmup", "1", "--batch", "2"]
    args += ["--seq", "64", "--gen", "8", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), *args],
        capture_output=True,
        text=True,
        timeout=110,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    report = json.loads(out.read_text())
    assert list(report["stages"]) == ["dpo", "reward", "ppo"]
    assert report["peak_flops"] is None
    for stage, result in report["stages"].items():
        assert f"### {stage}:" in proc.stdout
        assert result["fully_sharded"], f"{stage}: fully_shard was not applied"
        assert result["param_dtype"] == "bfloat16"
        assert result["peak_memory_gib"] is None  # CPU: no CUDA memory counter
        for phase, rates in result["phases"].items():
            assert rates["tokens_per_s_incl_padding"] > 0, (stage, phase)
            assert 0 < rates["tokens_per_s_excl_padding"] <= rates["tokens_per_s_incl_padding"]
            assert rates["mfu"] is None
            assert rates["steps_measured"] == 2  # 3 steps, the first left out
    assert set(report["stages"]["ppo"]["phases"]) == {
        "generation",
        "scoring",
        "update",
        "whole step",
    }
    # the tiny model: 2 layers of 64 wide; untied head over the 2048-word vocabulary
    dpo = report["stages"]["dpo"]
    assert dpo["total_params"] - dpo["matmul_params"] == 2048 * 64  # the input embeddings
