"""RewardModule: the Bradley–Terry reward model, trained on preference pairs.

The backbone (typically the SFT export) gets a scalar head; chosen and rejected go through it in
one forward, and the loss asks ``r(prompt, chosen) > r(prompt, rejected)``
(:func:`prefl.losses.bradley_terry_loss`, with the data's optional ``margin`` column and
``center_rewards_coefficient``). Metrics (:class:`~prefl.training.metrics.StageMetrics`,
correct across batches and ranks), logged at each epoch's end as ``train/…`` and ``val/…``:
``loss``, ``accuracy`` (strict ``>``), ``margin`` (mean ``r_c - r_r``), ``reward_mean`` and
``reward_std`` (over chosen and rejected). When training ends, the reward mean and std on the
validation pairs are computed and exported with the model (``reward_stats.json``) so that PPO can
normalise rewards. ``predict`` returns per-row rewards (see
:class:`prefl.callbacks.RewardWriter`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import PreTrainedTokenizerBase

from prefl.data.packing import is_packed
from prefl.functional import global_weighted_mean
from prefl.losses import bradley_terry_loss, reward_accuracy
from prefl.models import CausalLMSpec, disable_dropout
from prefl.models.reward import RewardModel, build_reward_model, reward_head
from prefl.models.sharding import full_state_dict
from prefl.modules.base import CausalLMModule
from prefl.training.metrics import StageMetrics
from prefl.training.schedules import WarmupCosineLR

_STATS = ("loss", "accuracy", "margin", "reward", "reward_sq")


class RewardModule(CausalLMModule):
    """Bradley–Terry reward model on ``pairs`` batches.

    Args:
        model: The backbone: a :class:`~prefl.models.CausalLMSpec` or a hub id / local path (a
            causal-LM checkpoint such as the SFT export gets a new scalar head; a one-label
            sequence-classifier checkpoint keeps its head). With ``lora``, the head is trained
            in full next to the adapters.
        tokenizer: The tokenizer; None = the data module's (the CLI links them).
        center_rewards_coefficient: λ of the reward-centering term ``λ·mean((r_c + r_r)²)``.
        disable_dropout: Turn the backbone's dropout off (the default, as in TRL's reward
            trainer): chosen and rejected are then compared under the same function, not under
            two independent dropout masks. False keeps the checkpoint's dropout rates.
        head_lr: Learning rate of the scalar head; None = the optimizer's, like the backbone's.
            A new head starts random, and at a fine-tuning learning rate (1e-5 to 1e-4) AdamW
            moves each of its weights by about that much a step, so in a short run it barely
            moves and only the backbone learns: a head rate 10-100x the backbone's helps (see
            docs/reward-model.md). Other per-group settings come from the optimizer.
        optimizer: Builds the optimizer from the trainable parameters (two parameter groups,
            backbone then head, when ``head_lr`` is set).
        lr_scheduler: Builds the scheduler; default linear warmup (10%) then cosine decay.
        max_nonfinite_steps: Consecutive optimizer steps with a NaN/inf loss or gradient that
            are skipped before the run stops (see :mod:`prefl.training.guard`).
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        center_rewards_coefficient: float = 0.0,
        disable_dropout: bool = True,
        head_lr: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, lr_scheduler, max_nonfinite_steps)
        self.center_rewards_coefficient = center_rewards_coefficient
        self.disable_dropout = disable_dropout
        if head_lr is not None and not head_lr > 0:
            raise ValueError(f"head_lr must be > 0 or None, got {head_lr}")
        self.head_lr = head_lr
        self.reward_stats: dict[str, float] | None = None
        self.metrics = StageMetrics(_STATS)

    def build_models(self) -> None:
        """Build the reward model (backbone + scalar head), dropout off unless kept."""
        tokenizer = self.resolve_tokenizer()
        self.model = RewardModel(build_reward_model(self.model_spec, tokenizer), tokenizer)
        if self.disable_dropout:
            disable_dropout(self.model)

    def optimizer_params(self) -> list[Any]:
        """The trainable parameters; with ``head_lr``, two groups: the backbone (the optimizer's
        learning rate) and the scalar head (``head_lr``)."""
        params = super().optimizer_params()
        if self.head_lr is None:
            return params
        head = {id(p) for p in reward_head(self.model.model).parameters()}
        rest = [p for p in params if id(p) not in head]
        return [
            {"params": rest},
            {"params": [p for p in params if id(p) in head], "lr": self.head_lr},
        ]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards ``(B,)`` of the chosen and the rejected completions, in one forward (padded
        rows, or the padding-free layouts of :mod:`prefl.data.packing`)."""
        if is_packed(batch):
            rewards = self.model.packed(batch)
        else:
            ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
            mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
            rewards = self.model(ids, mask)
        n = rewards.shape[0] // 2
        return rewards[:n], rewards[n:]

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        chosen, rejected = self(batch)
        losses = bradley_terry_loss(
            chosen, rejected, batch.get("margin"), self.center_rewards_coefficient
        )
        weights = batch.get("sample_weight")  # data-parallel padding repeats weigh 0
        loss = global_weighted_mean(losses, weights)
        both = torch.cat([chosen, rejected]).detach()
        values = {
            "loss": losses.detach(),
            "accuracy": reward_accuracy(chosen, rejected),
            "margin": (chosen - rejected).detach(),
            "reward": both,
            "reward_sq": both**2,
        }
        self.metrics.update(stage, values, weights)  # rewards: each pair's weight twice
        return loss

    def _log_epoch(self, stage: str) -> dict[str, float]:
        # the means are already reduced over ranks: every rank logs the same values
        out = self.metrics.log_epoch(
            self, stage, _epoch_summary, prog_bar=stage == "val", sync_dist=True
        )
        return {k: float(v) for k, v in out.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The Bradley–Terry loss of one batch."""
        loss = self._step(batch, "train")
        self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training metrics."""
        self._log_epoch("train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate validation metrics."""
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics."""
        self._log_epoch("val")

    @torch.no_grad()
    def compute_reward_stats(self, loader: Any) -> dict[str, float]:
        """Mean and (biased) std of the rewards of every chosen and rejected completion in
        ``loader``, exact over the real rows of the whole split: the sums are taken in float64,
        the data-parallel padding repeats (``sample_weight`` 0) left out, and, when
        ``torch.distributed`` is initialised, reduced over every rank (a collective: each rank
        passes its own shard of the split)."""
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # count, sum, sum of squares
        for batch in loader:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            chosen, rejected = self(batch)
            weight = batch.get("sample_weight", torch.ones_like(chosen)).to(torch.float64)
            weight = torch.cat([weight, weight])
            rewards = torch.cat([chosen, rejected]).to(torch.float64)
            sums += torch.stack(
                [weight.sum(), (weight * rewards).sum(), (weight * rewards**2).sum()]
            )
        self.model.train(was_training)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        count, total, total_sq = sums.tolist()
        if count == 0:
            raise ValueError("compute_reward_stats: the loader holds no real rows")
        mean = total / count
        return {
            "mean": mean,
            "std": math.sqrt(max(total_sq / count - mean**2, 0.0)),
            "count": int(round(count)),
        }

    def on_train_end(self) -> None:
        """Compute the reward statistics on the validation pairs (exported with the model)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None else []
        if not loader:
            rank_zero_warn(
                "RewardModule: no validation split, so no reward statistics are "
                "exported; PPO will not normalise rewards"
            )
            return
        self.reward_stats = self.compute_reward_stats(loader)
        s = self.reward_stats
        rank_zero_info(
            f"prefl reward: validation rewards mean {s['mean']:+.4f}, std "
            f"{s['std']:.4f} over {s['count']} completions"
        )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, list]:
        """Per-row rewards: ``chosen_reward`` / ``rejected_reward`` for ``pairs`` batches,
        ``reward`` for ``sft`` batches (prompt + completion)."""
        if "chosen_input_ids" in batch or "pair_sequences" in batch:
            chosen, rejected = self(batch)
            return {"chosen_reward": chosen.tolist(), "rejected_reward": rejected.tolist()}
        if is_packed(batch):
            return {"reward": self.model.packed(batch).tolist()}
        return {"reward": self.model(batch["input_ids"], batch["attention_mask"]).tolist()}

    def export(self, dirpath: str | Path) -> Path:
        """Write the reward model (LoRA merged), tokenizer and ``reward_stats.json`` (global rank 0;
        a sharded model is gathered first, so every rank calls this)."""
        if self.model is None:
            raise ValueError("export: the model is not built yet (call configure_model first)")
        self.model.stats = self.reward_stats
        if not self.sharded:
            return self.model.save_pretrained(dirpath) if self.global_rank == 0 else Path(dirpath)
        state = full_state_dict(self.model)  # a collective: every rank gathers
        if state is None:
            return Path(dirpath)
        inner = {k.removeprefix("model."): v for k, v in state.items()}
        return self.model.save_pretrained(dirpath, inner)


def _epoch_summary(means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logged epoch values from the means of ``_STATS``: the reward's mean and (biased) std
    over chosen and rejected from its first two moments."""
    std = torch.sqrt((means["reward_sq"] - means["reward"] ** 2).clamp(min=0))
    return {
        "loss": means["loss"],
        "accuracy": means["accuracy"],
        "margin": means["margin"],
        "reward_mean": means["reward"],
        "reward_std": std,
    }
