"""Reward-model training throughput and peak memory: prefl's ``RewardModule`` against TRL's
``RewardTrainer``.

Both libraries train a Bradley–Terry reward model (``-logσ(r_chosen − r_rejected)``) whose
backbone is the same random-init 4-layer, 256-wide Llama with a 32k vocabulary (saved once to a
temporary directory, see :mod:`trl_harness`), loaded as a one-label
``AutoModelForSequenceClassification`` (a new scalar head), on the same toy preference pairs read
from one JSONL file, with the same batch size (pairs per step), fp32, AdamW (fused, same lr, no
weight decay), constant learning rate, gradient clipping at 1 and the same number of torch
threads. Chosen and rejected go through one forward on both sides. prefl runs
``PreferenceDataModule`` + ``RewardModule`` under a Lightning ``Trainer``; TRL runs
``RewardTrainer`` with gradient checkpointing and bf16 (TRL's defaults) turned off. Throughput
counts preference pairs per second over the steps after the warmup; each run is its own
subprocess, libraries alternate, and the table reports medians and prefl/TRL ratios.

Run (about 3 minutes on 2 CPU cores)::

    python benchmarks/reward_vs_trl.py [--steps 120 --batch 16 --repeats 3 --threads 2]

Real data (``--data hh``, see :mod:`hh_data`): Anthropic HH pairs in SmolLM2's chat template, a
random-init SmolLM2-width Llama (10 layers; per token, forward: body 70.8 MFLOP, LM head 56.6 —
unused by a reward model, whose scalar head is 576 FLOPs), ``max_length`` 512, prompts of at
most 256 tokens (longer rows left out, so that neither side truncates), and five variants side
by side: prefl padded / packed / packed + shared prompt, TRL at its defaults and TRL grouped by
length (``padding_free`` does not exist for TRL 1.16's reward trainer). ``--layouts`` on toy
rows runs the three prefl layouts alone::

    python benchmarks/reward_vs_trl.py --data hh [--steps 7 --batch 4 --repeats 3]
    python benchmarks/reward_vs_trl.py --layouts --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch
from hh_workers import (
    add_layout_options,
    count_trl,
    finish_layout_worker,
    parse,
    prefl_layout_data,
    prepare_layouts,
    trl_layout_args,
    variants,
)
from layout_report import compare_variants
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

META: dict[str, Any] = {
    "name": "reward_vs_trl",
    "unit": "pairs",
    "title": "Reward model: prefl RewardModule vs TRL RewardTrainer",
    "matched": [
        "model: one random-init Llama (4 layers, hidden 256, 4 heads, vocab 32000) loaded from "
        "the same directory by both as a one-label sequence classifier, float32, no dropout",
        "data: the same toy preference pairs from one JSONL file; identical token ids "
        "(<bos> prompt completion <eos>), no row truncated or dropped at these lengths",
        "per-device batch size (pairs per step), max_length, no gradient accumulation",
        "loss: Bradley-Terry, no margin, no reward centering; chosen and rejected in one forward",
        "optimizer: torch AdamW fused, same lr, betas (0.9, 0.999), eps 1e-8, weight decay 0; "
        "constant lr; gradient-norm clipping at 1.0",
        "torch threads; no logging, evaluation, checkpointing or progress bar",
    ],
}
HH_META: dict[str, Any] = {
    "name": "reward_vs_trl_hh",
    "unit": "pairs",
    "title": "Reward model on HH rows (SmolLM2 tokenizer, 10-layer SmolLM2-width Llama)",
    "matched": [
        "model: one random-init Llama (10 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, "
        "vocab 49152, tied embeddings) as a one-label sequence classifier, float32, sdpa",
        "data: the same HH rows (prefl's parser) from one JSONL, rendered by both with SmolLM2's "
        "chat template; rows needing truncation left out, so neither side truncates: the same "
        "token ids, except that TRL keeps the newline the template writes after each reply's "
        "<|im_end|> (one more token per sequence; prefl ends a reply at <|im_end|>)",
        "JSONL: all 1961 HH rows that fit; each run trains on its sampler's first batch x "
        "steps rows; batch size, AdamW, clipping, threads as in the toy benchmark",
    ],
    "differs": [
        "batch composition: each sampler's own order (prefl's seeded shuffle, the same rows "
        "for every prefl layout; TRL's random / length-grouped sampler), so speeds are data "
        "tokens/s and pairs/s = that / the mean data tokens of a pair of the JSONL",
    ],
}
TOY_LAYOUTS_META: dict[str, Any] = {
    "name": "reward_layouts_toy",
    "unit": "pairs",
    "title": "Reward model on toy rows: prefl's layouts",
    "matched": META["matched"],
}
PREFL_VARIANTS = ["prefl_padded", "prefl_packed", "prefl_shared"]
HH_VARIANTS = [*PREFL_VARIANTS, "trl_default", "trl_grouped"]


def run_prefl(args: argparse.Namespace, clock: StepClock) -> Any:
    """``PreferenceDataModule`` + ``RewardModule`` under a Lightning ``Trainer``."""
    from lightning.pytorch import seed_everything

    from prefl import RewardModule

    seed_everything(args.seed, verbose=False)
    model_dir = str(args.workdir / "model")
    counter = None
    if args.variant:
        data, counter = prefl_layout_data(args, "pairs")
    else:
        data = prefl_data(args, "pairs")
    module = RewardModule(model_dir, optimizer=prefl_adamw(args.lr), lr_scheduler=None)
    prefl_trainer(args, clock).fit(module, datamodule=data)
    return counter


def run_trl(args: argparse.Namespace, clock: StepClock) -> Any:
    """TRL's ``RewardTrainer`` on the same directory and JSONL file."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model_dir = str(args.workdir / "model")
    dataset = load_dataset("json", data_files=str(args.workdir / "pairs.jsonl"), split="train")
    config = RewardConfig(
        **trl_common_args(args, str(args.workdir / "trl_out")),
        max_length=args.max_length,
        center_rewards_coefficient=None,
        **(trl_layout_args(args) if args.variant else {}),
    )
    trainer = RewardTrainer(
        model=model_dir,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[trl_clock(clock)],
    )
    counter = count_trl(trainer, args) if args.variant else None
    trainer.train()
    return counter


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Compare the libraries (or, with ``--worker``, run one of them and print its result)."""
    parser = base_parser(__doc__.split("\n")[0], steps=120, batch=16, lr=5e-5)
    hh = {"steps": 7, "warmup": 1, "batch": 4, "max_length": 512, "max_prompt_length": 256}
    add_layout_options(parser, hh)
    args = parse(parser, argv)
    script = Path(__file__).resolve()
    if args.worker is None and (args.data == "hh" or args.layouts):
        names = args.variants.split(",") if args.variants else None
        names = names or (HH_VARIANTS if args.data == "hh" else PREFL_VARIANTS)
        meta = HH_META if args.data == "hh" else TOY_LAYOUTS_META
        prepare = functools.partial(prepare_layouts, mode="pairs")
        return compare_variants(script, args, prepare, meta, variants(names))
    if args.worker is None:
        return compare(script, args, prepare_pairs, META)
    torch.set_num_threads(args.threads)
    clock = StepClock()
    counter = (run_prefl if args.worker == "prefl" else run_trl)(args, clock)
    if counter is not None:
        finish_layout_worker(clock, args, counter)
    else:
        finish_worker(clock, args, samples_per_step=args.batch)
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
