"""DPO training throughput and peak memory: prefl's ``DPOModule`` against TRL's ``DPOTrainer``.

Both libraries train the same random-init 4-layer, 256-wide Llama with a 32k vocabulary (saved
once to a temporary directory, see :mod:`trl_harness`) with the sigmoid DPO loss (β = 0.1) against
a frozen reference copy, on the same toy preference pairs read from one JSONL file, with the same
batch size (pairs per step), ``max_length``, fp32, AdamW (fused, same lr, no weight decay),
constant learning rate, gradient clipping at 1 and the same number of torch threads. prefl runs
``PreferenceDataModule`` + ``DPOModule`` under a Lightning ``Trainer``; TRL runs ``DPOTrainer``
with gradient checkpointing and bf16 (TRL's defaults) turned off. Throughput counts preference
pairs per second over the steps after the warmup; each run is its own subprocess, libraries
alternate, and the table reports medians and prefl/TRL ratios.

Run (about 4 minutes on 2 CPU cores)::

    python benchmarks/dpo_vs_trl.py [--steps 60 --batch 8 --repeats 3 --threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from trl_harness import (
    StepClock,
    finish_worker,
    prefl_adamw,
    prefl_data,
    prefl_trainer,
    prepare_pairs,
    trl_clock,
    trl_common_args,
)
from trl_report import base_parser, compare

BETA = 0.1
META: dict[str, Any] = {
    "name": "dpo_vs_trl",
    "unit": "pairs",
    "title": "DPO: prefl DPOModule vs TRL DPOTrainer",
    "matched": [
        "model: one random-init Llama (4 layers, hidden 256, 4 heads, vocab 32000) loaded from "
        "the same directory by both, float32, no dropout",
        "data: the same toy preference pairs from one JSONL file; identical token ids "
        "(<bos> prompt completion <eos>), no row truncated or dropped at these lengths",
        "per-device batch size (pairs per step), max_length, no gradient accumulation",
        "loss: sigmoid DPO, beta 0.1, frozen reference copy of the initial policy",
        "optimizer: torch AdamW fused, same lr, betas (0.9, 0.999), eps 1e-8, weight decay 0; "
        "constant lr; gradient-norm clipping at 1.0",
        "torch threads; no logging, evaluation, checkpointing or progress bar",
    ],
}


def run_prefl(args: argparse.Namespace, clock: StepClock) -> None:
    """``PreferenceDataModule`` + ``DPOModule`` under a Lightning ``Trainer``."""
    from lightning.pytorch import seed_everything

    from prefl import DPOModule

    seed_everything(args.seed, verbose=False)
    model_dir = str(args.workdir / "model")
    data = prefl_data(args, "pairs")
    module = DPOModule(
        model_dir,
        beta=BETA,
        loss_type="sigmoid",
        optimizer=prefl_adamw(args.lr),
        lr_scheduler=None,
    )
    prefl_trainer(args, clock).fit(module, datamodule=data)


def run_trl(args: argparse.Namespace, clock: StepClock) -> None:
    """TRL's ``DPOTrainer`` on the same directory and JSONL file."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model_dir = str(args.workdir / "model")
    dataset = load_dataset("json", data_files=str(args.workdir / "pairs.jsonl"), split="train")
    config = DPOConfig(
        **trl_common_args(args, str(args.workdir / "trl_out")),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=args.max_length,
    )
    trainer = DPOTrainer(
        model=model_dir,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[trl_clock(clock)],
    )
    trainer.train()


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Compare the libraries (or, with ``--worker``, run one of them and print its result)."""
    parser = base_parser(__doc__.split("\n")[0], steps=60, batch=8, lr=5e-5)
    args = parser.parse_args(argv)
    if args.worker is None:
        return compare(Path(__file__).resolve(), args, prepare_pairs, META)
    torch.set_num_threads(args.threads)
    clock = StepClock()
    (run_prefl if args.worker == "prefl" else run_trl)(args, clock)
    finish_worker(clock, args, samples_per_step=args.batch)
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
