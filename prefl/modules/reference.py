"""ReferenceModule: a causal LM trained against a frozen reference copy of its initial self.

DPO and PPO both regularise the policy towards a **reference** (the SFT model). This base class
owns it: a frozen copy of the initial policy (eval mode, ``requires_grad=False``, never in the
optimizer, never stepped), or, with LoRA, the policy itself with adapters disabled (no second
copy). It is left out of checkpoints when it can be rebuilt from ``model`` on resume, and kept in
them when it cannot (a random-init config) or when TR-DPO-style syncing
(``ref = α·policy + (1-α)·ref`` every ``ref_sync_every`` optimizer steps) has moved it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from prefl.models import build_causal_lm, disable_dropout, is_lora
from prefl.modules.base import CausalLMModule


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ReferenceModule(CausalLMModule):
    """Base class of modules with a frozen reference (see the module docstring).

    Subclasses call :meth:`build_reference` in ``build_models`` after building the policy,
    and set ``ref_sync_every`` / ``ref_mixup_alpha`` (None / unused = never sync).
    """

    reference: torch.nn.Module | None  # set to None in __init__, a module by build_reference
    ref_sync_every: int | None = None
    ref_mixup_alpha: float = 0.6

    def build_reference(self) -> None:
        """Disable dropout in the policy and make the frozen reference (none with LoRA)."""
        disable_dropout(self.model)
        if is_lora(self.model):
            if self.ref_sync_every is not None:
                raise ValueError(
                    "model.ref_sync_every (TR-DPO) is not supported with LoRA: the "
                    "reference is the base model with adapters disabled"
                )
            return
        self.reference = _freeze(copy.deepcopy(self.model))

    def shardable_models(self) -> list[torch.nn.Module]:
        """The policy and, when it is a separate copy, the frozen reference."""
        return [self.model, *([self.reference] if self.reference is not None else [])]

    def train(self, mode: bool = True) -> ReferenceModule:
        """Switch train/eval mode; the reference always stays in eval mode."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    @contextlib.contextmanager
    def reference_context(self) -> Iterator[torch.nn.Module]:
        """Yield the reference model: the frozen copy, the LoRA policy with adapters disabled,
        or (after precomputing) a fresh copy of the initial policy built from ``model``."""
        if is_lora(self.model):
            with self.model.disable_adapter():
                yield self.model
        elif self.reference is not None:
            yield self.reference
        else:
            rebuilt = _freeze(build_causal_lm(self.model_spec, self.resolve_tokenizer()))
            yield rebuilt.to(self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """TR-DPO: every ``ref_sync_every`` optimizer steps, ``ref = α·policy + (1-α)·ref``."""
        every = self.ref_sync_every
        if every is None or self.global_step == 0 or self.global_step % every:
            return
        if getattr(self, "_last_sync", -1) == self.global_step:
            return  # gradient accumulation: several batches end on the same step
        self._last_sync = self.global_step
        alpha = self.ref_mixup_alpha
        with torch.no_grad():
            for ref, pol in zip(self.reference.parameters(), self.model.parameters(), strict=True):
                if isinstance(ref, DTensor) != isinstance(pol, DTensor):
                    raise RuntimeError(
                        f"TR-DPO sync: {type(ref).__name__} reference parameter against a "
                        f"{type(pol).__name__} policy parameter"
                    )
                if isinstance(ref, DTensor):  # sharded alike: mix the local shards
                    ref, pol = ref.to_local(), pol.to_local()
                ref.mul_(1.0 - alpha).add_(pol.detach().to(ref.dtype), alpha=alpha)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Frozen submodules that checkpoints leave out because resume rebuilds them: the
        reference, unless TR-DPO moved it or ``model`` is a random-init config."""
        if self.reference is None or self.ref_sync_every is not None or not self._rebuildable():
            return {}
        if self.sharded:  # sharded checkpoints load strictly into every module: keep it
            return {}
        return {"reference": self.reference}

    def _rebuildable(self) -> bool:
        """Whether ``model`` names saved weights (a random-init config cannot rebuild them)."""
        spec = self.model_spec
        return isinstance(spec, str) or spec.name_or_path is not None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the :meth:`frozen_modules` out of the checkpoint's state dict."""
        state = checkpoint.get("state_dict", {})
        for name in self.frozen_modules():
            for key in [k for k in state if k.startswith(f"{name}.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the frozen modules' weights in from the rebuilt ones, so loading stays strict.
        (A sharded checkpoint has loaded every module's shards already and has no state dict.)"""
        state = checkpoint.get("state_dict")
        if state is None:
            return
        for name, module in self.frozen_modules().items():
            for key, value in module.state_dict().items():
                state.setdefault(f"{name}.{key}", value)
