"""Clipped PPO surrogate losses for the policy and the value head (Schulman et al. 2017).

Both losses work on per-token ``(B, T)`` tensors with a response mask (1 = valid token,
0 = padding or prompt) and share one reduction rule:

* ``num_tokens=None``: the masked mean over this batch's valid tokens;
* ``num_tokens=n``: the masked *sum* divided by ``n``. With gradient accumulation, a PPO
  minibatch is split into micro-batches whose valid-token counts differ; averaging each
  micro-batch on its own would weight the tokens of short micro-batches more. Passing the
  minibatch's total valid-token count as ``num_tokens`` to every micro-batch makes their losses
  (and gradients) add up exactly to the minibatch's token mean (no further division by the
  number of micro-batches).

Only ``torch`` is imported (plus :mod:`prefl.functional`'s masked reductions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefl.functional import masked_mean, masked_sum

__all__ = ["clipped_policy_loss", "clipped_value_loss"]


def _check(clip_eps: float, num_tokens: Tensor | float | None, *tensors: Tensor) -> None:
    """Raise ``ValueError`` on mismatched shapes, a negative ``clip_eps`` or ``num_tokens <= 0``."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"all inputs must have the same (B, T) shape, got {sorted(shapes)}")
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if isinstance(num_tokens, (int, float)) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")


def _reduce(per_token: Tensor, valid: Tensor, num_tokens: Tensor | float | None) -> Tensor:
    """Masked mean of ``per_token``, or its masked sum divided by ``num_tokens`` when given."""
    if num_tokens is None:
        return masked_mean(per_token, valid)
    return masked_sum(per_token, valid) / num_tokens


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate policy loss, per token.

    With ``ratio = exp(logprobs - old_logprobs)`` the per-token loss is
    ``max(-A * ratio, -A * clamp(ratio, 1 - clip_eps, 1 + clip_eps))``: once the ratio has
    moved past the clip range in the direction the advantage favours, the loss is constant
    and the token gives no gradient.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the current policy
            (carries the gradient).
        old_logprobs: ``(B, T)`` log-probabilities under the policy that sampled them
            (treated as constants).
        advantages: ``(B, T)`` advantages (treated as constants).
        mask: ``(B, T)`` bool or 0/1, 1 = valid response token, 0 = ignore. Masked entries of
            the other inputs may hold anything and receive exactly zero gradient.
        clip_eps: The clip range ``ε >= 0``.
        num_tokens: ``None`` for the masked mean; otherwise the masked sum is divided by this
            positive count (the minibatch's valid tokens when accumulating micro-batches; see
            the module docstring).

    Returns:
        ``(loss, clip_fraction, approx_kl)``: the 0-d loss; the fraction of valid tokens whose
        clipped branch is strictly larger (i.e. where clipping is active); and the masked mean
        of ``0.5 * (logprobs - old_logprobs)²``. The last two are detached masked means over
        this batch, whatever ``num_tokens`` is.

    Raises:
        ValueError: On mismatched shapes, negative ``clip_eps`` or non-positive ``num_tokens``.
    """
    _check(clip_eps, num_tokens, logprobs, old_logprobs, advantages, mask)
    valid = mask.bool()
    log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~valid, 0)
    adv = advantages.detach().masked_fill(~valid, 0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = _reduce(torch.maximum(unclipped, clipped), valid, num_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), valid)
        approx_kl = masked_mean(0.5 * log_ratio**2, valid)
    return loss, clip_fraction, approx_kl


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss, per token.

    With ``v_clip = old_values + clamp(values - old_values, -clip_eps, clip_eps)`` the
    per-token loss is ``0.5 * max((values - R)², (v_clip - R)²)``: the pessimistic of the
    unclipped and clipped squared errors, so the value head gets no gradient from a token
    once it has moved more than ``clip_eps`` from ``old_values`` in the direction of ``R``.

    Args:
        values: ``(B, T)`` current value predictions (carry the gradient).
        old_values: ``(B, T)`` value predictions at rollout time (treated as constants).
        returns: ``(B, T)`` regression targets ``R`` (treated as constants), e.g. from
            :func:`prefl.functional.gae`.
        mask: ``(B, T)`` bool or 0/1, 1 = valid response token, 0 = ignore. Masked entries of
            the other inputs may hold anything and receive exactly zero gradient.
        clip_eps: The clip range ``ε >= 0``, in the units of the values.
        num_tokens: ``None`` for the masked mean; otherwise the masked sum is divided by this
            positive count (see the module docstring).

    Returns:
        ``(loss, clip_fraction)``: the 0-d loss and the detached fraction of valid tokens
        whose clipped squared error is strictly larger than the unclipped one.

    Raises:
        ValueError: On mismatched shapes, negative ``clip_eps`` or non-positive ``num_tokens``.
    """
    _check(clip_eps, num_tokens, values, old_values, returns, mask)
    valid = mask.bool()
    values = values.masked_fill(~valid, 0)
    old_values = old_values.detach().masked_fill(~valid, 0)
    returns = returns.detach().masked_fill(~valid, 0)
    v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (v_clip - returns) ** 2
    loss = _reduce(0.5 * torch.maximum(unclipped, clipped), valid, num_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(unclipped.dtype), valid)
    return loss, clip_fraction
