"""PPO's logged metrics (design §5.12), gathered for :class:`~prefl.modules.ppo.PPOModule`.

:func:`rollout_means` gives the rollout's quantities as exact means over the real responses (or
valid tokens) of every data-parallel rank, in one reduction
(:func:`~prefl.training.metrics.global_means`); :func:`update_metrics` gives the per-rank values
(the KL coefficient, the update's statistics, the explained variance) that Lightning then averages
over ranks (``sync_dist``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prefl.functional import explained_variance
from prefl.training.metrics import global_sums
from prefl.training.ppo_rollout import Rollout
from prefl.training.ppo_update import UpdateStats


def rollout_means(
    rollout: Rollout, reduce: Callable[[Tensor], Tensor] | None
) -> tuple[dict[str, Tensor], int]:
    """The rollout's logged means over every rank's real responses (or valid tokens), with one
    reduction (:func:`~prefl.training.metrics.global_sums`), and the number of real responses.

    Args:
        rollout: This rank's rollout.
        reduce: Sums a 1-D tensor over ranks; None = this process only.

    Returns:
        ``(means, n)``: ``ppo/score``, ``ppo/score_raw``, ``ppo/reward`` (row sums), ``ppo/kl``
        (sequence KL), ``ppo/response_length``, ``ppo/eos_rate``, ``ppo/score_<source>`` per
        response, then ``ppo/advantage_mean`` and (with a critic) ``ppo/value_mean`` per token,
        0-d tensors; ``n`` the real responses of all ranks.
    """
    weights, mask, scores = rollout.weights, rollout.mask, rollout.scores
    per_response = {
        "ppo/score": scores["score"],
        "ppo/score_raw": scores["raw"],
        "ppo/reward": rollout.rewards.sum(-1),
        "ppo/kl": rollout.kl.sum(-1),
        "ppo/response_length": rollout.responses.response_mask.float().sum(-1),
        "ppo/eos_rate": rollout.responses.ended.float(),
        **{f"ppo/score_{k}": v for k, v in scores.items() if k not in ("score", "raw")},
    }
    values = {name: (value, weights) for name, value in per_response.items()}
    values["ppo/advantage_mean"] = (rollout.advantages, mask)
    if rollout.values is not None:
        values["ppo/value_mean"] = (rollout.values, mask)
    means, totals = global_sums(values, reduce)
    return means, round(float(totals["ppo/score"]))  # the weights' sum: the real responses


def update_metrics(rollout: Rollout, stats: UpdateStats, kl_coef: float) -> dict[str, Tensor]:
    """The per-rank metrics: ``ppo/kl_coef`` (β of the rollout), the update's statistics
    (``ppo/policy_loss``, ``ppo/clip_frac``, ``ppo/approx_kl``, ``ppo/entropy``, with a critic
    ``ppo/value_loss``, ``ppo/value_clip_frac``) and, with a critic, ``ppo/explained_variance``
    of the rollout's values against its returns; 0-d tensors."""
    metrics = {
        "ppo/kl_coef": torch.tensor(kl_coef),
        **{f"ppo/{k}": torch.tensor(v) for k, v in stats.as_dict().items()},
    }
    if rollout.values is not None:
        metrics["ppo/explained_variance"] = explained_variance(
            rollout.values, rollout.returns, rollout.mask
        )
    return metrics
