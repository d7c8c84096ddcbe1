"""KTOModule: Kahneman-Tversky optimisation on unpaired feedback (``unpaired`` batches).

Each row is one completion labelled desirable or undesirable (:mod:`prefl.data.unpaired`; paired
data is read as unpaired, chosen desirable and rejected undesirable). The loss is
:func:`prefl.losses.kto_loss` against the frozen reference, whose reference point ``z`` is the
policy's mean log-ratio on the rows' *mismatched* completions (each row's prompt with another
row's completion), detached and clamped at 0. ``z`` is taken over every rank's real rows
(data-parallel padding repeats left out), so it does not depend on how a batch is sharded, as
TRL gathers it over processes; its log-probs need no gradient. Precomputed reference log-probs
(``precompute_ref_logps``) are stored per row, the mismatched one included (it is fixed per row).

Metrics (correct across batches and ranks) as ``train/…`` and ``val/…``: ``loss``, ``kl``
(``z``), ``rewards/chosen`` and ``logps/chosen`` (means over desirable rows), and
``rewards/rejected`` and ``logps/rejected`` (undesirable rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from prefl.functional import global_weighted_mean
from prefl.functional.selected import masked_sequence_logps
from prefl.losses.kto import KTO_LOSSES, USES_KL, kto_loss
from prefl.models import CausalLMSpec
from prefl.modules.reference import ReferenceModule
from prefl.training.metrics import StageMetrics
from prefl.training.schedules import WarmupCosineLR

METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def gather_real(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``values`` ``(B,)`` of every rank, concatenated, without the weight-0 rows (a no-op
    gather on one process). Detached: for statistics such as KTO's reference point."""
    values = values.detach()
    keep = torch.ones_like(values, dtype=torch.bool) if weights is None else weights > 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        parts = [torch.empty_like(values) for _ in range(world)]
        masks = [torch.empty_like(keep) for _ in range(world)]
        torch.distributed.all_gather(parts, values.contiguous())
        torch.distributed.all_gather(masks, keep.contiguous())
        values, keep = torch.cat(parts), torch.cat(masks)
    return values[keep]


class KTOModule(ReferenceModule):
    """KTO of a causal LM on ``unpaired`` batches.

    Args:
        model: The policy: a :class:`~prefl.models.CausalLMSpec` or a hub id / local path (e.g.
            the SFT export). The reference is a frozen copy of it (with LoRA: the policy with its
            adapters disabled).
        tokenizer: The tokenizer; None = the data module's (the CLI links them).
        beta: β, the scale of the implicit reward ``log π − log π_ref``; > 0.
        desirable_weight: Weight of a desirable row's loss (raise it when desirable rows are
            fewer: TRL advises weight × count ratios between 1:1 and 4:3).
        undesirable_weight: Weight of an undesirable row's loss.
        loss_type: ``kto`` (the paper's loss, with the reference point) or
            ``apo_zero_unpaired`` (APO-zero, no reference point), see
            :data:`prefl.losses.kto.KTO_LOSSES`.
        precompute_ref_logps: Score the train and validation rows (and their mismatched
            completions) with the reference once before training, then free it.
        optimizer: Builds the optimizer from the trainable parameters.
        lr_scheduler: Builds the scheduler; default linear warmup (10%) then cosine decay.
        max_nonfinite_steps: Consecutive optimizer steps with a NaN/inf loss or gradient that
            are skipped before the run stops (see :mod:`prefl.training.guard`).
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: str = "kto",
        precompute_ref_logps: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, lr_scheduler, max_nonfinite_steps)
        if loss_type not in KTO_LOSSES:
            raise ValueError(
                f"model.loss_type must be one of {sorted(KTO_LOSSES)}, got {loss_type!r}"
            )
        if not beta > 0:
            raise ValueError(f"model.beta must be > 0, got {beta}")
        for key, weight in (
            ("desirable_weight", desirable_weight),
            ("undesirable_weight", undesirable_weight),
        ):
            if not weight >= 0:
                raise ValueError(f"model.{key} must be >= 0, got {weight}")
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.precompute_ref_logps = precompute_ref_logps
        self.reference: torch.nn.Module | None = None
        self.metrics = StageMetrics(METRICS)

    @property
    def uses_kl(self) -> bool:
        """Whether the loss type uses the reference point (the mismatched completions)."""
        return self.loss_type in USES_KL

    def build_models(self) -> None:
        """Build the policy (dropout off) and, unless LoRA provides it, the frozen reference."""
        super().build_models()
        self.build_reference()

    @staticmethod
    def _logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        ids, attention = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        return masked_sequence_logps(model, ids, attention, batch[f"{prefix}loss_mask"])[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Policy log-probs ``(B,)`` of the rows' completions (summed over their tokens)."""
        return self._logps(self.model, batch, "")

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``(B,)`` of the completions and of the mismatched completions
        (an empty tensor when the loss type uses none): precomputed columns, or a forward."""
        if "ref_logps" in batch:
            kl = batch["ref_kl_logps"] if self.uses_kl else batch["ref_kl_logps"][:0]
            return batch["ref_logps"], kl
        with self.reference_context() as reference:
            was_training = reference.training
            reference.eval()
            own = self._logps(reference, batch, "")
            kl = self._logps(reference, batch, "kl_") if self.uses_kl else own[:0]
            reference.train(was_training)
        return own, kl

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's ``losses``, ``rewards`` and policy ``logps`` ``(B,)`` and the reference
        point ``kl`` (a 0-d tensor), with ``z`` over every rank's real rows."""
        policy = self(batch)
        with torch.no_grad():
            policy_kl = self._logps(self.model, batch, "kl_") if self.uses_kl else policy[:0]
        reference, reference_kl = self.reference_logps(batch)
        if self.uses_kl:  # z over every rank's real rows
            weights = batch.get("sample_weight")
            policy_kl = gather_real(policy_kl, weights)
            reference_kl = gather_real(reference_kl, weights)
        losses, rewards, z = kto_loss(
            policy, reference, batch["label"], policy_kl, reference_kl.to(policy_kl.dtype),
            beta=self.beta, desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight, loss_type=self.loss_type,
        )  # fmt: skip
        return {"losses": losses, "rewards": rewards, "logps": policy, "kl": z}

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self.terms(batch)
        losses, labels = out["losses"], batch["label"]
        weights = batch.get("sample_weight")  # data-parallel padding repeats weigh 0
        loss = global_weighted_mean(losses, weights)
        ones = torch.ones_like(losses) if weights is None else weights
        desirable, undesirable = ones * labels, ones * ~labels
        self.metrics.update(stage, {"loss": losses, "kl": out["kl"].expand_as(losses)}, ones)
        chosen = {"rewards/chosen": out["rewards"], "logps/chosen": out["logps"]}
        self.metrics.update(stage, chosen, desirable)
        rejected = {"rewards/rejected": out["rewards"], "logps/rejected": out["logps"]}
        self.metrics.update(stage, rejected, undesirable)
        self.metrics.log(
            self, stage, on_step=stage == "train", prog_bar=("loss",), batch_size=losses.shape[0]
        )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The KTO loss of one batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate validation metrics."""
        self._step(batch, "val")

    def on_fit_start(self) -> None:
        """Precompute the reference log-probs of the train and validation rows (if asked)."""
        if self.precompute_ref_logps:
            self.precompute(("train", "val"))

    def precompute(self, stages: Sequence[str]) -> None:
        """Score the data module's splits with the reference and store ``ref_logps`` and
        ``ref_kl_logps`` as dataset columns, then free the reference."""
        datamodule = self.trainer.datamodule
        names = {"train": datamodule.hparams.train_split, "val": datamodule.hparams.val_split}
        for stage in stages:
            split = names[stage]
            dataset = datamodule.datasets.get(split)
            if dataset is None or "ref_logps" in dataset.column_names:
                continue
            size = datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size
            loader = DataLoader(dataset, batch_size=size, collate_fn=datamodule.collator)
            own, kl = [], []
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                a, b = self.reference_logps(batch)
                own += a.float().cpu().tolist()
                kl += b.float().cpu().tolist() if self.uses_kl else [0.0] * len(a)
            dataset = dataset.add_column("ref_logps", own)
            datamodule.datasets[split] = dataset.add_column("ref_kl_logps", kl)
            rank_zero_info(f"prefl kto: precomputed reference log-probs of {len(own)} {split} rows")
        if "train" in stages and self._rebuildable() and self.reference is not None:
            self.reference = None  # training reads the columns
