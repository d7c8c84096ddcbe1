"""The Bradley–Terry reward-model loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> Tensor:
    """Per-pair Bradley–Terry loss ``-logσ(r_c - r_r - margin) + λ·(r_c + r_r)²``.

    The first term is the negative log-likelihood that the chosen answer wins under the
    Bradley–Terry model (Ouyang et al. 2022, arXiv:2203.02155; with a margin as in Llama 2,
    arXiv:2307.09288). The second, with λ = ``center_rewards_coefficient``, pulls the rewards of
    each pair towards zero mean (Eisenstein et al. 2023, arXiv:2312.09244); averaged over the
    batch it is ``λ·mean((r_c + r_r)²)``, as in TRL.

    Args:
        chosen_rewards: ``(B,)`` rewards of the chosen completions.
        rejected_rewards: ``(B,)`` rewards of the rejected completions.
        margin: ``(B,)`` required reward gap per pair (e.g. from a rating difference); None = 0.
        center_rewards_coefficient: λ; 0 = no centering term.

    Returns:
        ``(B,)`` losses; take the mean for the batch loss.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


def reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``(B,)`` float: 1 where the chosen reward is strictly higher (ties count as wrong)."""
    return (chosen_rewards > rejected_rewards).to(torch.float32)
