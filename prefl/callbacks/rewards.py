"""Reward-model callbacks: per-row rewards to JSONL (``predict``), and the end-of-fit report.

:class:`RewardWriter` is what makes ``prefl predict`` useful for a reward model: every row of the
predicted split gets a JSON line with its index and rewards. :class:`RewardReport` answers "does
the reward model rank answers like the true reward?": held-out pair accuracy, and the Spearman
correlation between its scores and an oracle's on fresh held-out completions (the toy task's
generator and oracle by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.functional import spearman_corrcoef

from prefl.callbacks.samples import runs_on_this_rank
from prefl.generation.rewards import resolve_reward_fn
from prefl.tasks import toy


class RewardWriter(BasePredictionWriter):
    """Write ``predict`` outputs as JSON lines ``{"index": i, <reward keys>: ...}``.

    Args:
        path: Output file; with several processes each writes ``<path>.rank<N>``.
    """

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._file: Any = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open (truncate) the output file."""
        path = self.path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.name}.rank{trainer.global_rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", encoding="utf-8")

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, list],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write one line per row of the batch."""
        for i, index in enumerate(batch_indices):
            row = {"index": int(index), **{k: float(v[i]) for k, v in prediction.items()}}
            self._file.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the file and say where it is."""
        self._file.close()
        rank_zero_info(f"prefl: wrote per-row rewards to {self.path}")


class RewardReport(Callback):
    """After ``fit``: held-out pair accuracy, and Spearman correlation with an oracle.

    Args:
        oracle: Reward function the model should agree with: ``"toy"`` or
            ``"package.module:function"`` (``fn(prompts, completions) -> list[float]``).
        num_completions: Held-out toy completions (drawn from the toy generator) to correlate on.
        seed: Seed of that draw.
    """

    def __init__(self, oracle: str = "toy", num_completions: int = 1024, seed: int = 123) -> None:
        self.oracle = resolve_reward_fn(oracle)
        self.num_completions, self.seed = num_completions, seed
        self.results: dict[str, float] = {}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score held-out completions, print and log the report (global rank zero; every rank
        scores when the model is sharded, since its forwards are collectives)."""
        if not runs_on_this_rank(trainer, pl_module):
            return
        rows = toy.sft_rows(self.num_completions, seed=self.seed, held_out=True)
        prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        scores = torch.tensor(pl_module.model.score(prompts, completions), dtype=torch.float64)
        truth = torch.tensor(self.oracle(prompts, completions), dtype=torch.float64)
        self.results = {"spearman": float(spearman_corrcoef(scores, truth))}
        accuracy = trainer.callback_metrics.get("val/accuracy")
        if accuracy is not None:
            self.results["pair_accuracy"] = float(accuracy)
        lines = [
            f"prefl reward model: Spearman {self.results['spearman']:.3f} with the oracle "
            f"on {len(rows)} held-out completions"
        ]
        if "pair_accuracy" in self.results:
            lines.append(f"  held-out pair accuracy {self.results['pair_accuracy']:.3f}")
        rank_zero_info("\n".join(lines))
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"reward_report/{k}": v for k, v in self.results.items()}, step=trainer.global_step
            )
