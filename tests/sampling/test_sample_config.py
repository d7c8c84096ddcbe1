"""``prefl predict -c configs/toy/sample.yaml`` samples the toy SFT export and writes the SAMPLES
file that ``prefl pairs`` reads: one row per prompt, ``num_samples`` answers each."""

from __future__ import annotations

import json
from pathlib import Path

from prefl.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]


def test_the_toy_sample_config_writes_one_row_per_prompt(sft_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ of the config lands here
    build_cli(
        [
            "predict",
            "-c",
            str(ROOT / "configs/toy/sample.yaml"),
            f"--model.init_args.model={sft_dir}",
            f"--data.tokenizer={sft_dir}",
            "--data.max_samples=5",
            "--trainer.enable_progress_bar=false",
            "--return_predictions=false",
        ]
    )
    lines = (tmp_path / "runs/toy/samples/samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 5 and sorted(r["meta"]["row"] for r in rows) == [0, 1, 2, 3, 4]
    assert all(len(r["completions"]) == 4 and isinstance(r["prompt"], str) for r in rows)
