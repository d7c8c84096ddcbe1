"""Per-token reinforcement-learning helpers for PPO-style training: generalised advantage
estimation and KL estimators. Torch only."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438) per token.

    Runs the backward recursion over the time dimension::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    with ``V_{t+1} = A_{t+1} = 0`` past a row's last valid token (the episode ends there).
    ``rewards`` and ``values`` at masked positions are ignored entirely (they may hold any
    garbage, ``inf`` or ``NaN`` included). The mask is meant to be contiguous and
    right-padded; should it have a gap, each valid segment is treated as its own episode.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. KL penalties plus the score on the last
            token).
        values: ``(B, T)`` value estimates ``V_t`` of the state before each token; pass them
            detached, since the results are used as regression targets.
        mask: ``(B, T)`` bool or 0/1, 1 = response token, 0 = padding. A row may be all 0.
        gamma: Discount factor.
        lam: GAE ``lambda``: 0 gives one-step TD errors, 1 gives Monte-Carlo returns minus
            ``V_t``.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` with ``returns = advantages + values``, and
        both exactly 0 where ``mask`` is 0. The dtype is that of ``rewards``/``values``
        promoted to at least float32.

    Raises:
        ValueError: If the three tensors are not all ``(B, T)`` of the same shape.
    """
    if rewards.ndim != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must all be the same (B, T) shape"
        )
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    valid = mask.bool()
    rewards = rewards.to(dtype).masked_fill(~valid, 0)
    values = values.to(dtype).masked_fill(~valid, 0)
    next_value = values.new_zeros(values.shape[0])
    next_adv = values.new_zeros(values.shape[0])
    steps = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = torch.where(valid[:, t], delta + gamma * lam * next_adv, 0.0)
        next_value = values[:, t]  # already 0 where invalid: nothing leaks from padding
        steps.append(next_adv)
    if not steps:
        return values.clone(), values.clone()
    advantages = torch.stack(steps[::-1], dim=1)
    return advantages, (advantages + values).masked_fill(~valid, 0)


def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k1 = log π - log π_ref``: unbiased, high variance, can be negative per token."""
    return logprobs - ref_logprobs


def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k2 = (log π - log π_ref)² / 2``: biased, low variance, non-negative."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k3 = exp(d) - d - 1`` with ``d = log π_ref - log π``: unbiased, non-negative."""
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


#: Per-token estimators of ``KL(π ‖ π_ref)`` from samples of ``π`` by name; see :func:`kl_penalty`.
KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Elementwise estimate of ``KL(π ‖ π_ref)`` at tokens sampled from ``π``.

    Schulman's estimators (http://joschu.net/blog/kl-approx.html), with
    ``log r = ref_logprobs - logprobs``:

    * ``"k1"``: ``-log r = logprobs - ref_logprobs`` (unbiased, may be negative);
    * ``"k2"``: ``(log r)² / 2`` (biased, low variance, ``>= 0``);
    * ``"k3"``: ``r - 1 - log r`` (unbiased, ``>= 0``; computed with ``expm1``).

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the policy ``π``.
        ref_logprobs: ``(B, T)`` log-probabilities of the same tokens under ``π_ref``.
        kind: One of :data:`KL_ESTIMATORS` (``"k1"``, ``"k2"``, ``"k3"``).

    Returns:
        ``(B, T)`` per-token estimates. No masking is applied: multiply by the ``(B, T)``
        response mask (1 = valid) or reduce with :func:`masked_sum` / :func:`masked_mean`.

    Raises:
        ValueError: If ``kind`` is not a known estimator.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)
