"""``prefl predict -c configs/toy/sample.yaml`` on two data-parallel CPU processes (DDP, gloo):
every prompt written exactly once, each with its ``k`` answers, and the same rows as a
one-process run with the same seed. 7 prompts at batch 2 on 2 ranks: the distributed sampler
repeats one prompt to even out the ranks, and that repeat must not be written twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def _predict(sft_dir: str, cwd: Path, devices: int) -> list[dict]:
    args = [
        sys.executable,
        "-m",
        "prefl",
        "predict",
        "-c",
        str(ROOT / "configs/toy/sample.yaml"),
        f"--model.init_args.model={sft_dir}",
        f"--data.tokenizer={sft_dir}",
        "--data.max_samples=7",
        "--data.batch_size=2",
        f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        "--trainer.enable_progress_bar=false",
        "--return_predictions=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"sampling on {devices} processes hung (> {TIMEOUT_S} s)")
    assert done.returncode == 0, done.stderr[-3000:]
    path = cwd / "runs/toy/samples/samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_write_every_prompt_once_as_one_rank_does(sft_dir, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _predict(sft_dir, tmp_path / "one", devices=1)
    two = _predict(sft_dir, tmp_path / "two", devices=2)
    assert [r["meta"]["row"] for r in two] == list(range(7))  # each once, none dropped
    assert all(len(r["completions"]) == 4 for r in two)
    assert two == one
    assert not (tmp_path / "two/runs/toy/samples/parts").exists() or not list(
        (tmp_path / "two/runs/toy/samples/parts").iterdir()
    )
