"""Pieces of ``benchmarks/gpu_check.py``: an offline ~32k tokenizer, long toy rows, step timers.

Kept apart so the check itself stays a short script:

- :func:`build_tokenizer` (the one of :mod:`trl_harness`, re-exported): a word-level tokenizer
  (``tokenizers`` library, no download) holding the toy task's words, padded with synthetic
  words to the vocabulary size of a real model (32k), with distinct PAD, EOS, BOS and UNK.
- :func:`long_rows`: the toy task's rows joined end to end until each row nearly fills the
  sequence length, so throughput is measured on full sequences rather than 15-token ones.
- :class:`StepTimer`: a callback timing every training batch (CUDA-synchronised) and counting its
  tokens with and without padding; :func:`time_ppo_phases` splits PPO's step into generation,
  scoring and update.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Callback
from trl_harness import build_tokenizer

from prefl.tasks import toy

__all__ = ["StepTimer", "build_tokenizer", "long_rows", "matmul_params", "time_ppo_phases"]


def _fill(texts: list[str], budget: int, rng: random.Random) -> str:
    """Join random ``texts`` while the word count stays within ``budget`` (at least one)."""
    out: list[str] = []
    words = 0
    while True:
        text = rng.choice(texts)
        n = len(text.split())
        if out and words + n > budget:
            return " ".join(out)
        out.append(text)
        words += n


def long_rows(mode: str, n_rows: int, prompt_budget: int, seq: int, seed: int = 0) -> list[dict]:
    """``n_rows`` rows of ``mode`` (``pairs`` or ``prompts``) made of joined toy rows.

    Prompts hold at most ``prompt_budget`` words; pair completions fill the rest of ``seq``
    (one word is one token; BOS and EOS are kept out of the budgets).
    """
    rng = random.Random(seed)
    base = toy.toy_splits(mode, seed=seed)["train"]
    prompts = [r["prompt"] for r in base]
    rows = []
    for _ in range(n_rows):
        row = {"prompt": _fill(prompts, prompt_budget, rng)}
        if mode == "pairs":
            left = seq - len(row["prompt"].split()) - 2
            row["chosen"] = _fill([r["chosen"] for r in base], left, rng)
            row["rejected"] = _fill([r["rejected"] for r in base], left, rng)
        rows.append(row)
    return rows


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all but the input embeddings (a lookup). Under
    FSDP2 a sharded parameter is a DTensor whose ``numel`` is the full, global size."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Seconds and tokens (with / without padding) of every training batch.

    Tokens are those of the batch's ``*input_ids`` keys: for pairs, chosen and rejected both.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        _sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        _sync()
        ids = [v for k, v in batch.items() if k.endswith("input_ids")]
        masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
        self.steps.append(
            {
                "seconds": time.perf_counter() - self._start,
                "tokens_padded": float(sum(t.numel() for t in ids)),
                "tokens": float(sum(m.sum().item() for m in masks)),
            }
        )


@contextmanager
def time_ppo_phases(module: Any, log: list[dict[str, float]]):
    """Time PPO's phases on ``module`` (a :class:`prefl.PPOModule`), appending one record per
    rollout to ``log``: generation (the policy's ``generate`` calls), scoring (the rest of
    ``rollout``: policy and reference log-prob forwards, rewards, advantages) and update
    (``ppo_update``), with token counts.

    It wraps the instance's ``rollout`` and ``ppo_update`` and the policy's ``generate`` (instance
    attributes that shadow the methods); all three are removed again on exit.
    """
    original_rollout, original_update = module.rollout, module.ppo_update
    record: dict[str, float] = {}
    wrapped: list[torch.nn.Module] = []  # the policy, once built (configure_model) and wrapped

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync()
            record[key] = record.get(key, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    def rollout(batch, seed):
        if not wrapped:
            policy = module.model
            policy.generate = timed(policy.generate, "generation")
            wrapped.append(policy)
        record.clear()
        r = timed(original_rollout, "rollout")(batch, seed)
        resp = r.responses
        record["generated_padded"] = float(resp.response_ids.numel())
        record["generated"] = float(resp.response_mask.sum().item())
        record["sequence_padded"] = float(resp.query_ids.numel() + resp.response_ids.numel())
        record["sequence"] = float(resp.query_mask.sum().item() + resp.response_mask.sum().item())
        return r

    def update(r, seed):
        out = timed(original_update, "update")(r, seed)
        record["scoring"] = record["rollout"] - record.get("generation", 0.0)
        log.append(dict(record))
        return out

    module.rollout, module.ppo_update = rollout, update
    try:
        yield log
    finally:
        del module.rollout, module.ppo_update
        for policy in wrapped:
            del policy.generate
