"""The direct-preference loss API: :class:`DPOSettings`, :func:`dpo_loss`, :func:`dpo_loss_terms`.

Every knob of the loss (β, the loss types and their weights, label smoothing, the NLL weight,
SimPO's γ, DiscoPOP's τ) is a field of one frozen :class:`DPOSettings`, validated when it is
made; ``DPOModule`` builds it once from its arguments and passes it down. The loss types
themselves, one function each with its paper, live in :mod:`prefl.losses.dpo_variants` behind
the :data:`DPO_LOSSES` name table; this module combines them (mixtures with weights, an NLL term)
and computes the implicit rewards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from prefl.losses.dpo_variants import DPO_LOSSES, REFERENCE_FREE, PairLogps, sft


class DPOSettingsError(ValueError):
    """An invalid :class:`DPOSettings` field.

    Args:
        key: The field's name (``"loss_type"``...), for callers that name their own config key.
        message: What is wrong.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class DPOSettings:
    """The settings of a direct-preference loss, checked once when made.

    Args:
        beta: β, the strength of the KL regularisation (τ for IPO, λ for ORPO); > 0.
        loss_type: A name in :data:`DPO_LOSSES`, or a list of names (a mixture, MPO-style);
            stored as a tuple.
        loss_weights: One weight per loss type of a mixture; None = all 1. Stored as a tuple.
        label_smoothing: ε, the assumed rate of flipped labels, in ``[0, 0.5)`` (``sigmoid`` =
            cDPO, ``robust``, ``exo_pair``, ``simpo``, ``cpo``).
        nll_weight: Weight (>= 0) of the per-token NLL of the chosen completion (RPO's
            ``rpo_alpha``, CPO's ``cpo_alpha``); 0 = no NLL term.
        simpo_gamma: SimPO's margin γ.
        discopop_tau: DiscoPOP's temperature τ; > 0.

    Raises:
        DPOSettingsError: A field is invalid (its ``key`` names the field).
    """

    beta: float = 0.1
    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05

    def __post_init__(self) -> None:
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", types)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        self._check()

    def _check(self) -> None:
        unknown = [t for t in self.loss_type if t not in DPO_LOSSES]
        if unknown or not self.loss_type:
            raise DPOSettingsError(
                "loss_type", f"unknown loss_type {unknown}; expected one of {sorted(DPO_LOSSES)}"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise DPOSettingsError(
                "loss_weights",
                f"loss_weights has {len(self.loss_weights)} values for "
                f"{len(self.loss_type)} loss types",
            )
        for key, ok, rule in (
            ("beta", self.beta > 0, "> 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)"),
            ("nll_weight", self.nll_weight >= 0, ">= 0"),
            ("discopop_tau", self.discopop_tau > 0, "> 0"),
        ):
            if not ok:
                raise DPOSettingsError(key, f"{key} must be {rule}, got {getattr(self, key)}")

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type (all 1 unless ``loss_weights`` is set)."""
        return self.loss_weights or (1.0,) * len(self.loss_type)

    @property
    def needs_reference(self) -> bool:
        """Whether any loss type uses the reference's log-probs."""
        return not set(self.loss_type) <= REFERENCE_FREE

    @property
    def term_names(self) -> tuple[str, ...]:
        """The terms worth reporting one by one: each loss type of a mixture and ``"nll"`` when
        ``nll_weight`` is set; none for a single loss type alone (the loss is the term)."""
        nll = ("nll",) if self.nll_weight else ()
        return () if len(self.loss_type) == 1 and not nll else (*self.loss_type, *nll)


class DPOLoss(NamedTuple):
    """What :func:`dpo_loss` returns, all ``(B,)``; unpacks as ``losses, chosen, rejected``."""

    losses: Tensor
    """The weighted per-pair loss (with grad)."""
    chosen_rewards: Tensor
    """Detached implicit rewards ``β·(policy_logps - ref_logps)`` of the chosen completions
    (``β·policy_logps`` without a reference)."""
    rejected_rewards: Tensor
    """The same for the rejected completions."""


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


def _resolve(settings: DPOSettings | None, options: dict[str, Any]) -> DPOSettings:
    if settings is None:
        return DPOSettings(**options)
    return dataclasses.replace(settings, **options) if options else settings


def dpo_loss_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    settings: DPOSettings | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Per-pair losses ``(B,)`` of each loss type (unweighted), the NLL term when ``nll_weight``
    is set (key ``"nll"``), and their weighted sum (key ``"total"``).

    Arguments as in :func:`dpo_loss`.
    """
    s = _resolve(settings, options)
    needs_ref = [t for t in s.loss_type if t not in REFERENCE_FREE]
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {needs_ref} needs ref_chosen_logps and ref_rejected_logps")
    x = PairLogps(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        s,
    )
    terms = {name: DPO_LOSSES[name](x) for name in s.loss_type}
    total = sum(w * terms[name] for name, w in zip(s.loss_type, s.weights, strict=True))
    if s.nll_weight:
        if chosen_lengths is None:
            raise ValueError("nll_weight needs chosen_lengths (the NLL is per token)")
        terms["nll"] = sft(x)
        total = total + s.nll_weight * terms["nll"]
    terms["total"] = total
    return terms


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    settings: DPOSettings | None = None,
    **options: Any,
) -> DPOLoss:
    """Direct-preference losses with implicit rewards.

    Args:
        policy_chosen_logps: ``(B,)`` policy log-probs of the chosen completions (summed over
            completion tokens).
        policy_rejected_logps: ``(B,)`` same for the rejected completions.
        ref_chosen_logps: ``(B,)`` reference log-probs of the chosen completions (None only for
            reference-free loss types).
        ref_rejected_logps: ``(B,)`` same for the rejected completions.
        chosen_lengths: ``(B,)`` chosen completion lengths in tokens (for ``ipo``,
            ``sigmoid_norm``, ``simpo``, ``orpo``, ``sft`` and the NLL term).
        rejected_lengths: ``(B,)`` rejected completion lengths in tokens.
        settings: The loss settings; None = ``DPOSettings(**options)``.
        **options: :class:`DPOSettings` fields by name, overriding those of ``settings``:
            ``beta=0.1``, ``loss_type="sigmoid"``, ``label_smoothing=0.0``, ``loss_weights``,
            ``nll_weight``, ``simpo_gamma``, ``discopop_tau``.

    Returns:
        ``DPOLoss(losses, chosen_rewards, rejected_rewards)``, all ``(B,)``: the weighted
        per-pair loss, and the detached implicit rewards ``β·(policy_logps - ref_logps)``
        (``β·policy_logps`` without a reference).

    Raises:
        DPOSettingsError: An option is invalid (see :class:`DPOSettings`).
        ValueError: A loss type lacks the references or lengths it needs.
    """
    s = _resolve(settings, options)
    terms = dpo_loss_terms(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        settings=s,
    )
    chosen, rejected = implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, s.beta
    )
    return DPOLoss(terms["total"], chosen, rejected)
