"""DPOModule: direct preference optimisation (and its loss family) against a frozen reference.

The policy is loaded from ``model`` (typically the SFT export); the **reference** is a frozen copy
of that initial policy: eval mode, ``requires_grad=False``, never in the optimizer, and *not*
saved in checkpoints (resume rebuilds it from the same source; with TR-DPO sync, where it
changes, it is saved). With LoRA the reference is the same network with its adapters disabled,
so no second copy exists. ``precompute_ref_logps=True`` runs the reference once over the train
and validation splits before training, stores the log-probs as dataset columns, then frees it.

The loss settings are one :class:`~prefl.losses.DPOSettings`, built and checked in ``__init__``.
Chosen and rejected go through the model in one forward, stacked on the batch dimension. Metrics
(:class:`~prefl.training.metrics.StageMetrics`, correct across batches and ranks), for ``train/``
(step and epoch) and ``val/``:
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (strict
``>``), ``logps/chosen``, ``logps/rejected``, ``loss`` and, for mixtures or an NLL term,
``loss/<type>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from prefl.data.packing import is_packed
from prefl.functional import global_weighted_mean
from prefl.functional.selected import masked_sequence_logps
from prefl.losses.dpo import DPOSettings, DPOSettingsError, dpo_loss_terms, implicit_rewards
from prefl.models import CausalLMSpec, disable_dropout, is_lora
from prefl.models.packed import packed_sequence_logps
from prefl.modules.reference import ReferenceModule
from prefl.training.metrics import StageMetrics
from prefl.training.schedules import WarmupCosineLR

METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


class DPOModule(ReferenceModule):
    """Direct preference optimisation of a causal LM on ``pairs`` batches.

    The loss arguments (``beta`` to ``discopop_tau``) make ``self.settings``, one
    :class:`~prefl.losses.DPOSettings` checked here: a bad value raises a ``ValueError`` that
    names its config key (``model.loss_type``...).

    Args:
        model: The policy: a :class:`~prefl.models.CausalLMSpec` or a hub id / local path (e.g.
            the SFT export). The reference is a frozen copy of it.
        tokenizer: The tokenizer; None = the data module's (the CLI links them).
        beta: Strength of the KL regularisation (DPO's β; τ for IPO); > 0.
        loss_type: A loss name (see ``prefl.losses.DPO_LOSSES``) or a list of them (a mixture).
        loss_weights: Weights of a mixture's losses, one per type; None = all 1.
        label_smoothing: Assumed label-noise rate ε in ``[0, 0.5)`` (cDPO for ``sigmoid``;
            ``robust``, ``exo_pair``, ``simpo``, ``cpo``).
        nll_weight: Weight of an NLL term on the chosen completions (RPO's ``rpo_alpha``, CPO's
            ``cpo_alpha``), >= 0; 0 = none.
        simpo_gamma: SimPO's target reward margin γ.
        discopop_tau: DiscoPOP's temperature τ; > 0.
        precompute_ref_logps: Score the train and validation pairs with the reference once before
            training and free it (lower memory; needs no reference during training).
        ref_sync_every: TR-DPO: every this many optimizer steps, move the reference towards the
            policy; None = never (the reference stays the initial policy).
        ref_mixup_alpha: TR-DPO's α: ``ref = α * policy + (1 - α) * ref`` at each sync.
        optimizer: Builds the optimizer from the trainable parameters.
        lr_scheduler: Builds the scheduler; default linear warmup (10%) then cosine decay over the
            run. It steps after every optimizer step.
        max_nonfinite_steps: Consecutive optimizer steps with a NaN/inf loss or gradient that
            are skipped before the run stops (see :mod:`prefl.training.guard`).
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        simpo_gamma: float = 0.5,
        discopop_tau: float = 0.05,
        precompute_ref_logps: bool = False,
        ref_sync_every: int | None = None,
        ref_mixup_alpha: float = 0.6,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, lr_scheduler, max_nonfinite_steps)
        try:
            self.settings = DPOSettings(
                beta=beta,
                loss_type=loss_type,
                loss_weights=loss_weights,
                label_smoothing=label_smoothing,
                nll_weight=nll_weight,
                simpo_gamma=simpo_gamma,
                discopop_tau=discopop_tau,
            )
        except DPOSettingsError as err:
            raise ValueError(f"model.{err.key}: {err}") from None
        if ref_sync_every is not None and precompute_ref_logps:
            raise ValueError(
                "model.ref_sync_every (TR-DPO) needs a live reference: it cannot be "
                "combined with precompute_ref_logps"
            )
        self.precompute_ref_logps = precompute_ref_logps
        self.ref_sync_every, self.ref_mixup_alpha = ref_sync_every, ref_mixup_alpha
        self.reference: torch.nn.Module | None = None
        self.metrics = StageMetrics([*METRICS, *(f"loss/{t}" for t in self.settings.term_names)])

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses a reference (not every loss type is reference-free)."""
        return self.settings.needs_reference

    def build_models(self) -> None:
        """Build the policy (dropout off) and, unless LoRA provides it, the frozen reference."""
        super().build_models()
        if self.needs_reference:
            self.build_reference()
        else:
            disable_dropout(self.model)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Policy log-probs of a ``pairs`` batch: chosen and rejected in one forward.

        Returns ``chosen_logps``, ``rejected_logps`` (summed over completion tokens, ``(B,)``)
        and ``chosen_lengths``, ``rejected_lengths`` (completion tokens, ``(B,)``).
        """
        return self._pair_logps(self.model, batch)

    @staticmethod
    def _pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        # the LM head projects only the completion positions (see prefl.functional.selected)
        if is_packed(batch):  # padding-free (and prompt-shared) rows, see prefl.data.packing
            logps, lengths = packed_sequence_logps(model, batch)
        else:
            ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
            attention = torch.cat(
                [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
            )
            loss_mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
            logps, lengths = masked_sequence_logps(model, ids, attention, loss_mask)
        n = logps.shape[0] // 2
        return {
            "chosen_logps": logps[:n],
            "rejected_logps": logps[n:],
            "chosen_lengths": lengths[:n],
            "rejected_lengths": lengths[n:],
        }

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``(B,)`` of chosen and rejected: precomputed columns if the batch
        has them, else a no-grad forward of the reference."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is None and not is_lora(self.model):
            raise RuntimeError("DPOModule: no reference model and no precomputed ref_*_logps")
        with self.reference_context() as reference:
            was_training = reference.training
            reference.eval()
            out = self._pair_logps(reference, batch)
            reference.train(was_training)
        return out["chosen_logps"], out["rejected_logps"]

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        policy = self(batch)
        ref_chosen, ref_rejected = (None, None)
        if self.needs_reference:
            ref_chosen, ref_rejected = self.reference_logps(batch)
        logps = (policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected)
        kwargs = {
            "chosen_lengths": policy["chosen_lengths"],
            "rejected_lengths": policy["rejected_lengths"],
            "settings": self.settings,
        }
        # one evaluation gives the loss and, for mixtures or an NLL term, its breakdown
        terms = dpo_loss_terms(*logps, **kwargs)
        losses = terms["total"]
        chosen_r, rejected_r = implicit_rewards(*logps, self.settings.beta)
        weights = batch.get("sample_weight")  # data-parallel padding repeats weigh 0
        loss = global_weighted_mean(losses, weights)
        values = {
            "loss": losses,
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/margins": chosen_r - rejected_r,
            "rewards/accuracies": (chosen_r > rejected_r).float(),
            "logps/chosen": policy["chosen_logps"],
            "logps/rejected": policy["rejected_logps"],
            **{f"loss/{name}": terms[name] for name in self.settings.term_names},
        }
        self.metrics.update(stage, values, weights)
        self.metrics.log(
            self,
            stage,
            on_step=stage == "train",
            prog_bar=("loss", "rewards/accuracies"),
            batch_size=policy["chosen_logps"].shape[0],
        )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The preference loss of one batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate validation metrics."""
        self._step(batch, "val")

    def on_fit_start(self) -> None:
        """Precompute the reference log-probs of the train and validation splits (if asked)."""
        if self.precompute_ref_logps and self.needs_reference:
            self.precompute(("train", "val"))

    def on_validation_start(self) -> None:
        """Precompute the validation split's reference log-probs for ``validate`` runs."""
        if self.precompute_ref_logps and self.needs_reference and self.reference is not None:
            self.precompute(("val",))

    def precompute(self, stages: Sequence[str]) -> None:
        """Score the data module's splits with the reference, store the log-probs as dataset
        columns ``ref_chosen_logps`` / ``ref_rejected_logps``, then free the reference."""
        datamodule = self.trainer.datamodule
        names = {"train": datamodule.hparams.train_split, "val": datamodule.hparams.val_split}
        for stage in stages:
            split = names[stage]
            dataset = datamodule.datasets.get(split)
            if dataset is None or "ref_chosen_logps" in dataset.column_names:
                continue
            loader = DataLoader(
                dataset,
                batch_size=datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size,
                collate_fn=datamodule.collator,
            )
            chosen, rejected = [], []
            with torch.random.fork_rng(devices=[]):  # leave the RNG (data order) as it was
                for batch in loader:
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    c, r = self.reference_logps(batch)
                    chosen += c.float().cpu().tolist()
                    rejected += r.float().cpu().tolist()
            dataset = dataset.add_column("ref_chosen_logps", chosen)
            datamodule.datasets[split] = dataset.add_column("ref_rejected_logps", rejected)
            rank_zero_info(
                f"prefl dpo: precomputed reference log-probs of {len(chosen)} {split} pairs"
            )
        if "train" in stages and not is_lora(self.model) and self._rebuildable():
            self.reference = None  # no longer needed: training reads the columns
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
