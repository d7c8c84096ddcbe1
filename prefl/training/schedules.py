"""Learning-rate schedules that need the run's length: linear warmup then cosine decay.

:class:`WarmupCosineLR` is an ``LRSchedulerCallable``-compatible scheduler (it takes the
optimizer first) whose total number of steps may be left unset: prefl's modules fill it in from
``trainer.estimated_stepping_batches`` when the optimizers are configured, so YAML configs never
have to repeat the run length. (It is filled in at ``on_train_start``, once the training data
loader exists, so hooks that change the data before training, such as DPO's reference
precompute, are counted.)
"""

from __future__ import annotations

import math

import torch


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup from 0 to the base LR, then cosine decay to ``min_lr_ratio`` of it.

    Args:
        optimizer: The optimizer whose learning rates are scheduled.
        total_steps: Optimizer steps in the run; None = filled in by the module from the Trainer.
        warmup_ratio: Share of ``total_steps`` spent warming up (TRL's ``warmup_ratio``).
        min_lr_ratio: Final learning rate as a share of the base one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.total_steps, self.warmup_ratio, self.min_lr_ratio = (
            total_steps,
            warmup_ratio,
            min_lr_ratio,
        )
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """LR multiplier at optimizer step ``step`` (0-based)."""
        total = max(1, self.total_steps or 1)
        warmup = int(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length and re-apply the current step's learning rate."""
        self.total_steps = int(total_steps)
        factor = self.factor(self.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Scheduler state without the (unpicklable) bound lambda."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.__dict__.update(state_dict)
