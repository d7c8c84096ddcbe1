"""SFTModule: supervised fine-tuning on prompt + completion, the loss on completion tokens only.

SFT teaches the *shape* of an answer and yields the model every later stage starts from (and the
frozen reference of DPO and PPO). It reads the data module's ``sft`` batches (``input_ids``,
``attention_mask``, ``loss_mask``) and logs, through
:class:`~prefl.training.metrics.StageMetrics` (token-weighted, correct across batches and
data-parallel ranks): ``train/loss``, ``train/token_accuracy``, and ``val/loss``,
``val/token_accuracy``, ``val/perplexity`` (the exponential of the token-mean validation NLL).

The loss is the token mean over every rank *and* every micro-batch of a gradient-accumulation
window (:class:`~prefl.training.accumulation.TokenMeanWindow`): an optimizer step with
``accumulate_grad_batches=k`` equals the step on the same rows as one batch.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from transformers import PreTrainedTokenizerBase

from prefl.data.packing import is_packed
from prefl.functional import next_token_targets
from prefl.functional.selected import scored_tokens
from prefl.losses import sft_loss
from prefl.models import CausalLMSpec
from prefl.models.packed import packed_scored_tokens
from prefl.modules.base import CausalLMModule
from prefl.training.accumulation import TokenMeanWindow
from prefl.training.metrics import StageMetrics


class SFTModule(CausalLMModule):
    """Supervised fine-tuning of a causal LM on completion tokens.

    Args:
        model: The causal LM: a :class:`~prefl.models.CausalLMSpec`, or a hub id / local path.
        tokenizer: The tokenizer; None = the data module's (the CLI links them).
        optimizer: Builds the optimizer from the trainable parameters.
        lr_scheduler: Optional scheduler, stepped after every optimizer step.
        max_nonfinite_steps: Consecutive optimizer steps with a NaN/inf loss or gradient that
            are skipped before the run stops (see :mod:`prefl.training.guard`).
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, lr_scheduler, max_nonfinite_steps)
        self.window = TokenMeanWindow()
        self.metrics = StageMetrics(["loss", "token_accuracy"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` for right-padded ``input_ids`` ``(B, T)`` (mask 1 = real)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    def _step(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the stage's metrics; returns this rank's token-NLL sum and token count."""
        # the LM head projects only the scored positions: (N, V) logits for N target tokens;
        # data-parallel padding repeats (sample_weight 0) contribute no tokens
        weights = batch.get("sample_weight")
        if is_packed(batch):  # padding-free rows, see prefl.data.packing
            scored = packed_scored_tokens(self.model, batch, weights)
        else:
            labels, mask = next_token_targets(batch["input_ids"], batch["loss_mask"])
            if weights is not None:
                mask = mask & (weights[:, None] > 0)
            ids, attention = batch["input_ids"], batch["attention_mask"]
            scored = scored_tokens(self.model, ids, attention, labels, mask)
        loss, n_tokens, correct = sft_loss(*scored)
        weight = n_tokens.float()
        accuracy = correct.float() / weight.clamp(min=1)
        self.metrics.update(stage, {"loss": loss, "token_accuracy": accuracy}, weight)
        return loss * weight, n_tokens

    def on_train_start(self) -> None:
        """Start with an empty accumulation window; warn where it cannot be exact (DeepSpeed)."""
        super().on_train_start()
        self.window = TokenMeanWindow()
        if self.trainer.accumulate_grad_batches > 1 and isinstance(
            self.trainer.strategy, DeepSpeedStrategy
        ):
            rank_zero_warn(
                "SFTModule: under DeepSpeed the loss is the token mean of each micro-batch, not "
                "of the whole accumulate_grad_batches window (DeepSpeed keeps the gradients)"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One step's loss; logs ``train/loss`` and ``train/token_accuracy`` (step and epoch)."""
        nll_sum, n_tokens = self._step(batch, "train")
        # this rank's share of the window's token mean over every rank (see TokenMeanWindow)
        loss = self.window.loss(nll_sum, n_tokens)
        self.metrics.log(self, "train", on_step=True, prog_bar=["loss"])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient into that of the window's token mean, then run the
        non-finite guard."""
        self.window.rescale(optimizer, self.trainer.accumulate_grad_batches)
        super().on_before_optimizer_step(optimizer)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate validation NLL and token accuracy."""
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss``, ``val/token_accuracy`` and ``val/perplexity`` for the epoch."""
        self.metrics.log_epoch(self, "val", _with_perplexity, prog_bar=True)


def _with_perplexity(means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The validation means plus ``perplexity``, the exponential of the token-mean NLL."""
    return {**means, "perplexity": torch.exp(means["loss"])}
