"""KL coefficient controllers for PPO (design §5.11): fixed, or adaptive towards a target KL.

The adaptive rule is Ziegler et al. 2019 (arXiv:1909.08593): after each rollout,
``err = clip(KL / target - 1, -0.2, 0.2)`` and ``β ← β · (1 + err · n / horizon)``, with ``n``
the number of responses in the rollout. Its state is saved in checkpoints.
"""

from __future__ import annotations


class KLController:
    """The KL coefficient β, fixed or adaptive.

    Args:
        init_kl_coef: β at the start.
        target: Target sequence KL in nats for the adaptive rule; None = fixed β.
        horizon: Adaptation horizon (in responses) of the adaptive rule.
    """

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt β after a rollout of ``n_steps`` responses whose mean sequence KL was
        ``current_kl`` (no-op when fixed)."""
        if self.target is None:
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | None]:
        """The controller's state (for checkpoints)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
