"""The direct-preference loss API: :func:`dpo_loss`, :func:`dpo_loss_terms`, implicit rewards.

The loss types themselves, one function each with its paper, live in
:mod:`prefl.losses.dpo_variants` behind the :data:`DPO_LOSSES` name table; this module combines
them (mixtures with weights, an NLL term) and computes the implicit rewards.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from prefl.losses.dpo_variants import DPO_LOSSES, REFERENCE_FREE, PairLogps, sft

__all__ = [
    "DPO_LOSSES",
    "REFERENCE_FREE",
    "PairLogps",
    "dpo_loss",
    "dpo_loss_terms",
    "implicit_rewards",
]


def implicit_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """Detached implicit rewards ``β·(policy_logps - ref_logps)`` of chosen and rejected ``(B,)``;
    ``β·policy_logps`` without a reference."""
    chosen, rejected = policy_chosen_logps.detach(), policy_rejected_logps.detach()
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        chosen = chosen - ref_chosen_logps.detach()
        rejected = rejected - ref_rejected_logps.detach()
    return beta * chosen, beta * rejected


def dpo_loss_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    nll_weight: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
) -> dict[str, Tensor]:
    """Per-pair losses ``(B,)`` of each loss type (unweighted), the NLL term when ``nll_weight``
    is set (key ``"nll"``), and their weighted sum (key ``"total"``).

    Arguments as in :func:`dpo_loss`.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} values for {len(types)} loss types")
    unknown = [t for t in types if t not in DPO_LOSSES]
    if unknown or not types:
        raise ValueError(f"unknown loss_type {unknown}; expected one of {sorted(DPO_LOSSES)}")
    needs_ref = [t for t in types if t not in REFERENCE_FREE]
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {needs_ref} needs ref_chosen_logps and ref_rejected_logps")
    x = PairLogps(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta,
        label_smoothing,
        simpo_gamma,
        discopop_tau,
    )
    terms = {name: DPO_LOSSES[name](x) for name in types}
    total = sum(w * terms[name] for name, w in zip(types, weights, strict=True))
    if nll_weight:
        if chosen_lengths is None:
            raise ValueError("nll_weight needs chosen_lengths (the NLL is per token)")
        terms["nll"] = sft(x)
        total = total + nll_weight * terms["nll"]
    terms["total"] = total
    return terms


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    nll_weight: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct-preference losses with implicit rewards.

    Args:
        policy_chosen_logps: ``(B,)`` policy log-probs of the chosen completions (summed over
            completion tokens).
        policy_rejected_logps: ``(B,)`` same for the rejected completions.
        ref_chosen_logps: ``(B,)`` reference log-probs of the chosen completions (None only for
            reference-free loss types).
        ref_rejected_logps: ``(B,)`` same for the rejected completions.
        beta: β, the strength of the KL regularisation (τ for IPO, λ for ORPO).
        loss_type: A name in :data:`DPO_LOSSES`, or a list of names (a mixture, MPO-style).
        label_smoothing: ε, the assumed rate of flipped labels (``sigmoid`` = cDPO, ``robust``,
            ``exo_pair``, ``simpo``, ``cpo``).
        chosen_lengths: ``(B,)`` chosen completion lengths in tokens (for ``ipo``,
            ``sigmoid_norm``, ``simpo``, ``orpo``, ``sft`` and the NLL term).
        rejected_lengths: ``(B,)`` rejected completion lengths in tokens.
        loss_weights: One weight per loss type of a mixture; None = all 1.
        nll_weight: Weight of the per-token NLL of the chosen completion (RPO's ``rpo_alpha``,
            CPO's ``cpo_alpha``); 0 = no NLL term.
        simpo_gamma: SimPO's margin γ.
        discopop_tau: DiscoPOP's temperature τ.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, all ``(B,)``: the weighted per-pair
        loss, and the detached implicit rewards ``β·(policy_logps - ref_logps)`` (``β·policy_logps``
        without a reference).
    """
    terms = dpo_loss_terms(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        nll_weight=nll_weight,
        simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau,
    )
    chosen, rejected = implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return terms["total"], chosen, rejected
