"""Masked reductions over valid (non-padding, non-prompt) positions, whitening, and the
explained-variance diagnostic. Torch only."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum ``values`` over the positions where ``mask`` is 1.

    Masked-out entries are ignored even when they hold ``inf`` or ``NaN``.

    Args:
        values: Tensor of any shape, typically ``(B, T)``.
        mask: Bool or 0/1 tensor broadcastable to ``values`` (1 = keep, 0 = ignore).
        dim: Dimension(s) to reduce; ``None`` reduces over every element.

    Returns:
        The masked sum with ``dim`` reduced (a scalar when ``dim`` is ``None``).
    """
    return values.masked_fill(~mask.bool(), 0).sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Average ``values`` over the positions where ``mask`` is 1.

    A reduction with no valid element (e.g. a fully masked row when ``dim`` is given)
    returns 0 instead of ``NaN``.

    Args:
        values: Tensor of any shape, typically ``(B, T)``.
        mask: Bool or 0/1 tensor broadcastable to ``values`` (1 = keep, 0 = ignore).
        dim: Dimension(s) to reduce; ``None`` reduces over every element.

    Returns:
        The masked mean with ``dim`` reduced (a scalar when ``dim`` is ``None``).
    """
    valid = mask.bool().expand_as(values)
    count = valid.sum(dim=dim).clamp(min=1)
    return masked_sum(values, valid, dim=dim) / count


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Compute the variance of ``values`` over all positions where ``mask`` is 1.

    Args:
        values: Tensor of any shape, typically ``(B, T)``.
        mask: Bool or 0/1 tensor broadcastable to ``values`` (1 = keep, 0 = ignore).
        unbiased: Apply Bessel's correction (divide by ``n - 1`` instead of ``n``, where ``n``
            is the number of valid elements). With a single valid element this gives ``NaN``.

    Returns:
        A scalar tensor with the masked variance (0 when no element is valid).
    """
    valid = mask.bool().expand_as(values)
    centered = values - masked_mean(values, valid)
    var = masked_mean(centered**2, valid)
    if unbiased:
        count = valid.sum()
        var = var * count / (count - 1)
    return var


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` to zero mean and unit variance over the positions where ``mask`` is 1.

    Computes ``(values - mean) / sqrt(var + eps)`` where ``mean`` and the *biased* variance
    ``var`` (divided by ``n``, not ``n - 1``) are taken over every valid element at once (all
    dimensions, not per row). Masked-out entries never influence the statistics, even when
    they hold ``inf`` or ``NaN``.

    Args:
        values: ``(B, T)`` (or any shape) tensor to normalise, e.g. per-token advantages.
        mask: Bool or 0/1 tensor broadcastable to ``values`` (1 = valid, 0 = ignore).
        shift_mean: If ``False``, add the mean back after scaling, i.e. only rescale to unit
            variance and keep the original mean.
        eps: Added to the variance before the square root, for numerical stability.

    Returns:
        A tensor shaped like ``values``, exactly 0 where ``mask`` is 0 (all zeros when no
        element is valid).
    """
    valid = mask.bool().expand_as(values)
    values = values.masked_fill(~valid, 0)
    mean = masked_mean(values, valid)
    var = masked_var(values, valid, unbiased=False)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~valid, 0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Diagnostic ``1 - Var[returns - values] / Var[returns]`` over the valid positions.

    Both variances are biased (divided by ``n``) and taken over every position where ``mask``
    is 1 at once. 1 means the value head predicts the returns perfectly, 0 that it does no
    better than a constant, negative that it does worse.

    Args:
        values: ``(B, T)`` predicted values.
        returns: ``(B, T)`` target returns.
        mask: ``(B, T)`` bool or 0/1, 1 = valid, 0 = ignore (masked entries may be garbage).

    Returns:
        A detached 0-d tensor (float32, or float64 for float64 inputs), never ``NaN``: when
        ``Var[returns]`` is 0 (constant returns, or no valid position) the ratio is undefined
        and 0 is returned.
    """
    dtype = torch.promote_types(torch.promote_types(values.dtype, returns.dtype), torch.float32)
    valid = mask.bool().expand_as(returns)
    returns = returns.detach().to(dtype).masked_fill(~valid, 0)
    values = values.detach().to(dtype).masked_fill(~valid, 0)
    var_returns = masked_var(returns, valid, unbiased=False)
    var_residual = masked_var(returns - values, valid, unbiased=False)
    safe = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
    return torch.where(var_returns > 0, 1 - var_residual / safe, torch.zeros_like(safe))


def global_weighted_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``values`` ``(B,)`` weighted by ``weights`` ``(B,)`` over all data-parallel
    ranks, as this rank's share of the loss.

    Returns ``sum(w * v) * world_size / sum_over_ranks(w)``: DDP and FSDP average gradients
    over ranks, so the gradient they apply is that of the global weighted mean, however the
    rows (and the weight-0 padding repeats of an uneven last batch) fall on the ranks. On one
    process it is the ordinary weighted mean. A collective when ``torch.distributed`` is
    initialised: every rank must call it.

    Args:
        values: Per-row values ``(B,)`` (e.g. per-pair losses), with gradient.
        weights: Per-row weights ``(B,)`` (1 = a real row, 0 = a padding repeat); None = all 1.
    """
    weights = torch.ones_like(values) if weights is None else weights.to(values)
    total = weights.detach().sum()
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        total = total.clone()
        torch.distributed.all_reduce(total)
    return (values * weights).sum() * world / total.clamp(min=torch.finfo(values.dtype).tiny)


def global_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """:func:`whiten` with the mean and biased variance taken over the valid elements of every
    data-parallel rank (one ``all_reduce`` of three sums), so a rollout sharded over ranks is
    normalised as one batch would be. Without ``torch.distributed`` it equals :func:`whiten`.
    A collective when ``torch.distributed`` is initialised: every rank must call it.

    Args:
        values: ``(B, T)`` (or any shape) tensor, e.g. per-token advantages.
        mask: Bool or 0/1 tensor broadcastable to ``values`` (1 = valid).
        eps: Added to the variance before the square root.

    Returns:
        A tensor shaped like ``values``, 0 where ``mask`` is 0.
    """
    valid = mask.bool().expand_as(values)
    values = values.masked_fill(~valid, 0)
    sums = torch.stack([values.sum(), (values**2).sum(), valid.sum().to(values.dtype)]).double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    count = sums[2].clamp(min=1)
    mean = sums[0] / count
    var = (sums[1] / count - mean**2).clamp(min=0)
    whitened = (values - mean.to(values.dtype)) * torch.rsqrt(var.to(values.dtype) + eps)
    return whitened.masked_fill(~valid, 0)
