"""The non-finite guard: no optimizer step is ever taken with a NaN or infinite loss or gradient.

Every backward records whether its loss was finite (``on_before_backward``); right before each
optimizer step (``on_before_optimizer_step``, which Lightning calls under automatic and manual
optimisation alike, after gradients are all-reduced) the gradients are checked too. The verdict
is summed over ranks, so every rank decides the same (under FSDP each rank only sees its own
gradient shard). A bad step is skipped: its gradients are dropped (``zero_grad(set_to_none=True)``,
so the optimizer leaves every parameter and its state untouched), ``train/nonfinite_steps``
counts it, and a warning names the step and batch. A skipped step still counts in Lightning's
``global_step`` (and the learning-rate schedule advances), as with fp16's gradient scaler.
After ``max_nonfinite_steps`` consecutive bad steps the run stops with :class:`NonFiniteError`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class NonFiniteGuardMixin:
    """Hooks of :class:`~prefl.modules.base.CausalLMModule` that skip non-finite steps.

    The module sets ``max_nonfinite_steps`` (consecutive skipped steps before the run stops;
    0 = stop at the first one).
    """

    max_nonfinite_steps: int = 10

    def _guard_state(self) -> dict[str, Any]:
        if not hasattr(self, "_nonfinite"):
            self._nonfinite = {"loss": False, "skipped": 0, "consecutive": 0, "batch": -1}
        return self._nonfinite

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Remember the batch index for the guard's messages."""
        self._guard_state()["batch"] = batch_idx

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Record a non-finite loss (the step it feeds will be skipped)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            self._guard_state()["loss"] = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the step (drop its gradients) if any rank saw a non-finite loss or gradient."""
        state = self._guard_state()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads if g is not None]
        # one reduction per gradient and one host sync: NaN and inf survive a sum
        total = sum(g.sum(dtype=torch.float32) for g in local) if local else torch.tensor(0.0)
        bad = state["loss"] or not bool(torch.isfinite(total))
        state["loss"] = False
        flag = torch.tensor(float(bad), device=self.device)
        if self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        if float(flag) == 0:
            state["consecutive"] = 0
            return
        optimizer.zero_grad(set_to_none=True)
        state["skipped"] += 1
        state["consecutive"] += 1
        where = f"global step {self.trainer.global_step}, batch {state['batch']}"
        if state["consecutive"] > self.max_nonfinite_steps:
            raise NonFiniteError(
                f"non-finite loss or gradient in {state['consecutive']} consecutive optimizer "
                f"steps (the last at {where}); max_nonfinite_steps={self.max_nonfinite_steps}. "
                "Lower the learning rate, check the data, or use bf16-mixed instead of fp16"
            )
        rank_zero_warn(f"prefl: skipped the optimizer step at {where}: non-finite loss or gradient")
        self.log("train/nonfinite_steps", float(state["skipped"]), on_step=True, on_epoch=False)
