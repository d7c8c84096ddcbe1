"""The KTO loss on unpaired feedback (Ethayarajh et al. 2024, arXiv:2402.01306).

Each row is one completion with a label: desirable (a thumbs-up) or undesirable. With the
implicit reward ``r = log π(y|x) − log π_ref(y|x)`` and a reference point ``z``, the batch's mean
log-ratio of *mismatched* (prompt, completion) pairs (an estimate of KL(π ‖ π_ref)), detached and
clamped at 0, the value of a completion is ``σ(β(r − z))`` when desirable and ``σ(β(z − r))`` when
undesirable, and its loss one minus that value, weighted by ``desirable_weight`` or
``undesirable_weight``: prospect theory's asymmetric utility around a reference point. The
variant ``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, arXiv:2408.06266) drops the reference
point: ``1 − σ(βr)`` for desirable completions, ``σ(βr)`` for undesirable ones. The values are
TRL's (``KTOTrainer``, 1.16). Each variant is one function in :data:`KTO_LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _kto(ratios: Tensor, labels: Tensor, z: Tensor, beta: float) -> Tensor:
    return torch.where(
        labels,
        1 - torch.sigmoid(beta * (ratios - z)),
        1 - torch.sigmoid(beta * (z - ratios)),
    )


def _apo_zero_unpaired(ratios: Tensor, labels: Tensor, z: Tensor, beta: float) -> Tensor:
    return torch.where(labels, 1 - torch.sigmoid(beta * ratios), torch.sigmoid(beta * ratios))


#: ``loss_type`` -> per-row loss ``(log-ratios, labels, z, beta) -> (B,)``, before weighting.
KTO_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    "kto": _kto,
    "apo_zero_unpaired": _apo_zero_unpaired,
}
#: Variants that use the reference point ``z`` (the others need no mismatched pairs).
USES_KL = frozenset({"kto"})


def kto_reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """``z``: the mean log-ratio of the ``M`` mismatched pairs, detached and clamped at 0 (a
    0-d tensor; 0 when ``M == 0``)."""
    if policy_kl_logps.numel() == 0:
        return policy_kl_logps.new_zeros(())
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    policy_kl_logps: Tensor,
    reference_kl_logps: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KTO losses, implicit rewards and the reference point.

    Args:
        policy_logps: ``(B,)`` summed completion log-probs under the policy.
        reference_logps: ``(B,)`` the same under the reference (or precomputed).
        labels: ``(B,)`` bool, True = desirable.
        policy_kl_logps: ``(M,)`` policy log-probs of mismatched (prompt, completion) pairs.
        reference_kl_logps: ``(M,)`` the same under the reference.
        beta: β, the implicit reward's scale.
        desirable_weight: Weight of a desirable row's loss.
        undesirable_weight: Weight of an undesirable row's loss.
        loss_type: A key of :data:`KTO_LOSSES`.

    Returns:
        ``(losses, rewards, kl)``: ``(B,)`` weighted losses (their mean is the batch loss, as in
        TRL), ``(B,)`` detached rewards ``β·(log π − log π_ref)``, and the detached scalar ``z``
        (0 for a variant without a reference point).

    Raises:
        ValueError: An unknown ``loss_type``, or inputs of mismatched shapes.
    """
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(KTO_LOSSES)}, got {loss_type!r}")
    if not policy_logps.shape == reference_logps.shape == labels.shape:
        shapes = (tuple(policy_logps.shape), tuple(reference_logps.shape), tuple(labels.shape))
        raise ValueError(f"policy_logps, reference_logps and labels differ in shape: {shapes}")
    if policy_kl_logps.shape != reference_kl_logps.shape:
        raise ValueError("policy_kl_logps and reference_kl_logps differ in shape")
    labels = labels.to(torch.bool)
    ratios = policy_logps - reference_logps
    if loss_type in USES_KL:
        z = kto_reference_point(policy_kl_logps, reference_kl_logps).to(ratios.dtype)
    else:
        z = ratios.new_zeros(())
    weights = torch.where(
        labels, ratios.new_tensor(desirable_weight), ratios.new_tensor(undesirable_weight)
    )
    losses = weights * KTO_LOSSES[loss_type](ratios, labels, z, beta)
    return losses, beta * ratios.detach(), z
