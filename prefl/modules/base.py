"""The shared base of prefl's LightningModules: model building, optimizers, export.

:class:`CausalLMModule` owns what every stage repeats: the tokenizer (given, or taken from the
Trainer's data module), the causal LM built in ``configure_model`` (so strategies that shard or
delay initialisation can wrap it), the injected optimizer and scheduler (``OptimizerCallable`` /
``LRSchedulerCallable``, configurable from YAML), and :meth:`CausalLMModule.export` to a Hugging
Face directory that the next stage loads by path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from transformers import PreTrainedTokenizerBase

from prefl.data import load_tokenizer
from prefl.models import CausalLMSpec, build_causal_lm, is_lora, merge_lora
from prefl.models.sharding import (
    broadcast_sharded,
    data_parallel_mesh,
    empty_weights,
    full_state_dict,
    is_sharded,
)
from prefl.training.checkpoints import CheckedCheckpointIO
from prefl.training.guard import NonFiniteGuardMixin
from prefl.training.precision import warn_if_slow_cpu_bf16
from prefl.training.schedules import WarmupCosineLR


class CausalLMModule(NonFiniteGuardMixin, LightningModule):
    """Base class: a causal LM, its tokenizer and its optimizer.

    Args:
        model: The causal LM: a :class:`~prefl.models.CausalLMSpec` (or its fields as a dict),
            or a hub id / local path.
        tokenizer: The tokenizer (``"toy"``, hub id, path or instance). None = the Trainer's
            data module's tokenizer (the CLI links the two, so they always agree).
        optimizer: Builds the optimizer from the trainable parameters.
        lr_scheduler: Builds a learning-rate scheduler from the optimizer; it steps after every
            optimizer step. None = constant learning rate.
        max_nonfinite_steps: Optimizer steps with a NaN/inf loss or gradient are skipped
            (counted in ``train/nonfinite_steps``); this many in a row stop the run with
            :class:`~prefl.training.guard.NonFiniteError`.
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        if isinstance(model, dict):  # hyperparameters read back from a checkpoint
            model = CausalLMSpec(**model)
        self.save_hyperparameters(
            ignore=["tokenizer", "optimizer", "lr_scheduler", "value_optimizer"]
        )
        if dataclasses.is_dataclass(model):  # plain types only: checkpoints load weights_only
            self.hparams["model"] = dataclasses.asdict(model)
        if max_nonfinite_steps < 0:
            raise ValueError(f"model.max_nonfinite_steps={max_nonfinite_steps}; expected >= 0")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.model_spec = model
        self.tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.model: torch.nn.Module | None = None

    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The module's tokenizer, or the attached data module's when none was given."""
        if self.tokenizer is None:
            trainer = self._trainer
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
            if datamodule is None or getattr(datamodule, "tokenizer", None) is None:
                raise ValueError(
                    f"{type(self).__name__}: no tokenizer; pass `tokenizer=` or fit with a "
                    "PreferenceDataModule (its tokenizer is used)"
                )
            self.tokenizer = datamodule.tokenizer
        return self.tokenizer

    def setup(self, stage: str) -> None:
        """Before Lightning restores anything, make the strategy check a checkpoint before it
        loads it (:class:`~prefl.training.checkpoints.CheckedCheckpointIO`): a damaged one gets a
        clear error naming the intact ones beside it."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is not None and not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
            strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
        # Lightning's model summary has no size table for mixed precision and says so on every
        # run; prefl's configs use bf16-mixed knowingly, and the summary is otherwise right
        warnings.filterwarnings(
            "ignore", message=r"Precision .*-mixed is not supported by the model summary"
        )
        if self._trainer is not None:  # bf16 emulated by this CPU: ~100x slower, say so
            on_cpu = self._trainer.strategy.root_device.type == "cpu"
            warn_if_slow_cpu_bf16(self._trainer.precision, on_cpu)

    def configure_model(self) -> None:
        """Build the models once (:meth:`build_models`); under Lightning's
        ``ModelParallelStrategy`` shard every one of them with FSDP2, rank 0 reading the weights
        and broadcasting them (see :mod:`prefl.models.sharding`)."""
        if self.model is not None:
            self._quiet_frozen_eval_warning()
            return
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            self.build_models()
        else:
            mesh = data_parallel_mesh(mesh)
            rank0 = torch.distributed.get_rank() == 0
            with contextlib.nullcontext() if rank0 else empty_weights():
                self.build_models()
            device = self.trainer.strategy.root_device
            for model in self.shardable_models():
                broadcast_sharded(model, mesh, device, rank0)
        self._check_lengths()
        self._quiet_frozen_eval_warning()

    def _quiet_frozen_eval_warning(self) -> None:
        """Lightning warns about every module in eval mode when training starts. prefl keeps its
        frozen models (reference, reward model: no trainable parameter) in eval mode on purpose,
        so the warning is silenced for exactly that many modules; any other module in eval mode
        changes the count, and the warning shows again."""
        frozen = [
            m
            for m in self.modules()
            if not m.training and not any(p.requires_grad for p in m.parameters())
        ]
        evaluating = [m for m in self.modules() if not m.training]
        if frozen and len(frozen) == len(evaluating):
            warnings.filterwarnings(
                "ignore", message=rf"Found {len(frozen)} module\(s\) in eval mode at the start"
            )

    def build_models(self) -> None:
        """Build ``self.model`` (subclasses add the reference, reward and value models)."""
        self.model = build_causal_lm(self.model_spec, self.resolve_tokenizer())

    def shardable_models(self) -> list[torch.nn.Module]:
        """The Hugging Face models this module holds, each sharded on its own (FSDP2 roots)."""
        return [self.model]

    @property
    def sharded(self) -> bool:
        """Whether the models were sharded in :meth:`configure_model`."""
        return self.model is not None and is_sharded(self.model)

    def _check_lengths(self) -> None:
        """Fail early when the data's ``max_length`` exceeds the model's position range."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        limits = getattr(datamodule, "limits", None)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if limits is not None and positions is not None and limits.max_length > positions:
            raise ValueError(
                f"data.max_length={limits.max_length} exceeds the model's "
                f"max_position_embeddings={positions}; lower data.max_length"
            )

    def configure_optimizers(self) -> Any:
        """The injected optimizer over trainable parameters, with the optional scheduler."""
        optimizer = self.optimizer_factory(self.optimizer_params())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def optimizer_params(self) -> list[Any]:
        """What the optimizer factory is given: the trainable parameters (a module may return
        parameter groups instead, as :class:`~prefl.modules.reward.RewardModule` does for
        ``head_lr``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Any = None,
    ) -> None:
        """Step, then free the gradients at once (automatic optimisation). Lightning clears them
        only inside the next step's closure, after that step's forward, so a full gradient
        copy would otherwise sit in memory through every forward, where the peak is."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def on_train_start(self) -> None:
        """Give a :class:`WarmupCosineLR` without ``total_steps`` the run's length."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
                scheduler.set_total_steps(self.trainer.estimated_stepping_batches)

    def export(self, dirpath: str | Path) -> Path:
        """Write the model (LoRA merged) and tokenizer as a Hugging Face directory (safetensors).

        A sharded model is gathered first, so every rank must call this; only global rank 0
        writes (with LoRA it rebuilds an unsharded copy on the CPU to merge the adapters into).

        Args:
            dirpath: Target directory, created if needed.

        Returns:
            The directory, loadable with ``AutoModelForCausalLM.from_pretrained`` and
            ``AutoTokenizer.from_pretrained``.
        """
        if self.model is None:
            raise ValueError("export: the model is not built yet (call configure_model first)")
        out = Path(dirpath)
        if not self.sharded:
            if self.global_rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                merge_lora(self.model).save_pretrained(out, safe_serialization=True)
                self.resolve_tokenizer().save_pretrained(out)
            return out
        state = full_state_dict(self.model)  # a collective: every rank gathers
        if state is None:
            return out
        out.mkdir(parents=True, exist_ok=True)
        if is_lora(self.model):  # merge on an unsharded copy that rank 0 rebuilds
            with torch.device("cpu"):
                copy = build_causal_lm(self.model_spec, self.resolve_tokenizer())
            copy.load_state_dict(state)
            merge_lora(copy).save_pretrained(out, safe_serialization=True)
        else:
            self.model.save_pretrained(out, state_dict=state, safe_serialization=True)
        self.resolve_tokenizer().save_pretrained(out)
        return out
