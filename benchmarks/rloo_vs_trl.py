"""RLOO training throughput and peak memory: prefl's ``PPOModule(advantage_estimator="rloo")``
against TRL's ``RLOOTrainer``.

Both libraries start from the same random-init 4-layer, 256-wide Llama with a 32k vocabulary
(saved once to a temporary directory, see :mod:`trl_harness`), read the same toy prompts from one
JSONL file and, every optimizer step, sample ``--num-generations`` completions for each of
``--batch`` prompts (pure sampling at temperature 1, no top-k/top-p, exactly
``--max-new-tokens`` new tokens at most, the KV cache through ``generate``), score them with the
same reward function (the toy oracle, :func:`prefl.tasks.toy.oracle_rewards`, on the decoded
completions), take the old-policy and reference log-probs (two no-grad forwards), subtract
``0.05 ×`` the sequence KL (k1) from the score, form leave-one-out advantages, and take one clipped
policy-gradient step (one pass, one minibatch: prefl ``ppo_epochs=1, mini_batch_size=None``, TRL
``num_iterations=1``), fp32, AdamW (fused, same lr, no weight decay), gradient clipping at 1, the
same torch threads. Throughput counts generated completions per second (prompts × generations per
step) over the steps after the warmup; each run is its own subprocess, libraries alternate, and
the table reports medians and prefl/TRL ratios.

Run (about 4 minutes on 2 CPU cores)::

    python benchmarks/rloo_vs_trl.py [--steps 24 --batch 4 --num-generations 4
                                      --max-new-tokens 16 --repeats 3 --threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from trl_harness import (
    StepClock,
    build_model_dir,
    finish_worker,
    prefl_adamw,
    prefl_data,
    prefl_trainer,
    toy_oracle_reward,
    toy_prompt_rows,
    trl_clock,
    trl_common_args,
    write_jsonl,
)
from trl_report import base_parser, compare

KL_COEF = 0.05
META: dict[str, Any] = {
    "name": "rloo_vs_trl",
    "unit": "completions",
    "title": "RLOO: prefl PPOModule(advantage_estimator='rloo') vs TRL RLOOTrainer",
    "matched": [
        "model: one random-init Llama (4 layers, hidden 256, 4 heads, vocab 32000) loaded from "
        "the same directory by both, float32, no dropout; the reference is a frozen copy",
        "prompts: the same toy prompts from one JSONL file, tokenized to the same ids (<bos> ...)",
        "prompts per step, completions per prompt, max new tokens; sampling at temperature 1 "
        "without top-k/top-p through transformers generate with the KV cache",
        "reward: the toy oracle (prefl.tasks.toy.oracle_rewards) on the decoded completions, no "
        "EOS penalty, no clipping, no normalisation",
        "KL: k1 summed over the completion, 0.05 x KL subtracted from the score; leave-one-out "
        "baseline; advantages not whitened",
        "one policy update per rollout (one epoch, one minibatch), clip epsilon 0.2",
        "optimizer: torch AdamW fused, same lr, betas (0.9, 0.999), eps 1e-8, weight decay 0; "
        "constant lr; gradient-norm clipping at 1.0",
        "torch threads; no logging, evaluation, checkpointing or progress bar",
    ],
}


def parser() -> argparse.ArgumentParser:
    """The shared options plus generations per prompt and completion length."""
    p = base_parser(__doc__.split("\n")[0], steps=24, batch=4, lr=1e-5)
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16, help="most tokens per completion")
    return p


def prepare(workdir: Path, args: argparse.Namespace) -> None:
    """The shared model directory and prompts (enough rows for every step)."""
    build_model_dir(workdir / "model", seed=args.seed)
    rows = toy_prompt_rows(max(256, args.batch * (args.steps + 1)), seed=args.seed)
    write_jsonl(workdir / "prompts.jsonl", rows)


def run_prefl(args: argparse.Namespace, clock: StepClock) -> None:
    """``PreferenceDataModule(mode="prompts")`` + ``PPOModule`` (RLOO) under a Lightning
    ``Trainer`` (manual optimisation: the module clips and steps itself)."""
    from lightning.pytorch import seed_everything

    from prefl import PPOModule

    seed_everything(args.seed, verbose=False)
    model_dir = str(args.workdir / "model")
    data = prefl_data(args, "prompts")
    module = PPOModule(
        model_dir,
        reward_fns=["trl_harness:toy_oracle_reward"],
        advantage_estimator="rloo",
        num_samples=args.num_generations,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        kl_coef=KL_COEF,
        kl_penalty="reward",
        no_eos_score=None,
        whiten_advantages=False,
        ppo_epochs=1,
        mini_batch_size=None,
        clip_eps=0.2,
        max_grad_norm=1.0,
        optimizer=prefl_adamw(args.lr),
        log_samples_every=0,
        seed=args.seed,
    )
    prefl_trainer(args, clock, clip=False).fit(module, datamodule=data)


def run_trl(args: argparse.Namespace, clock: StepClock) -> None:
    """TRL's ``RLOOTrainer`` on the same directory and JSONL file."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    model_dir = str(args.workdir / "model")
    dataset = load_dataset("json", data_files=str(args.workdir / "prompts.jsonl"), split="train")
    common = trl_common_args(args, str(args.workdir / "trl_out"))
    common["per_device_train_batch_size"] = args.batch * args.num_generations  # completions
    config = RLOOConfig(
        **common,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=KL_COEF,
        num_iterations=1,
        epsilon=0.2,
        normalize_advantages=False,
        disable_dropout=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    trainer = RLOOTrainer(
        model=model_dir,
        reward_funcs=toy_oracle_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[trl_clock(clock)],
    )
    trainer.train()


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Compare the libraries (or, with ``--worker``, run one of them and print its result)."""
    args = parser().parse_args(argv)
    if args.worker is None:
        return compare(Path(__file__).resolve(), args, prepare, META)
    torch.set_num_threads(args.threads)
    clock = StepClock()
    (run_prefl if args.worker == "prefl" else run_trl)(args, clock)
    finish_worker(clock, args, samples_per_step=args.batch * args.num_generations)
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
