"""Torch-only functional helpers shared by the preference-tuning losses and modules.

This module holds two families of building blocks:

* masked reductions (:func:`masked_sum`, :func:`masked_mean`, :func:`masked_var`) used to
  average per-token quantities over the valid (non-padding, non-prompt) positions;
* memory-efficient log-probabilities of given labels under a language model's logits
  (:func:`token_logps`, :func:`sequence_logps`);
* per-token reinforcement-learning helpers for PPO-style training: :func:`whiten`,
  generalised advantage estimation (:func:`gae`), KL estimators (:func:`kl_penalty`), a chunked
  :func:`entropy_from_logits` and the :func:`explained_variance` diagnostic.

The log-probability functions exist because the naive recipe
``log_softmax(logits.float(), -1).gather(...)`` materialises a full ``(B, T, V)`` float32
tensor in the forward pass and keeps it alive for the backward pass. With vocabularies of
100k+ tokens that tensor dominates activation memory. Here a custom autograd function walks
the ``(B*T, V)`` rows in chunks, so only one chunk's float32 temporaries exist at a time and
the only tensor saved for backward besides small ``(B*T,)`` vectors is the caller's own
``logits``. Only ``torch`` is imported so that any part of the package (or a benchmark) can use
these helpers without pulling in Lightning or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "KL_ESTIMATORS",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "sequence_logps",
    "token_logps",
    "whiten",
]

# Target number of float32 elements in one chunk's temporaries (64 MiB).
_CHUNK_ELEMENTS = 2**24


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


def _chunks(logits: Tensor, chunk_size: int) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, stop, rows)`` with ``rows = logits`` seen as ``(B*T, V)``, ``[start:stop]``.

    Every ``rows`` is a view (never a copy) holding at most ``chunk_size`` rows. When
    ``logits`` cannot be flattened without a copy (e.g. the causally shifted
    ``logits[:, :-1]``), a chunk that crosses a sequence boundary is yielded in two pieces.
    """
    batch, seq_len, vocab = logits.shape
    n_rows = batch * seq_len
    try:
        flat = logits.view(n_rows, vocab)
    except RuntimeError:
        flat = None
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        if flat is not None:
            yield start, stop, flat[start:stop]
            continue
        while start < stop:
            b, t = divmod(start, seq_len)
            end = min(stop, (b + 1) * seq_len)
            yield start, end, logits[b, t : t + end - start]
            start = end


class _ChunkedTokenLogps(torch.autograd.Function):
    """Per-token label log-probabilities computed over chunks of ``(B*T, V)`` rows.

    Forward saves only the caller's ``logits`` (no copy), the clamped flat labels, the flat
    bool mask and the per-row log-sum-exp; backward recomputes the softmax chunk by chunk.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, logits: Tensor, labels: Tensor, mask: Tensor, chunk_size: int
    ) -> Tensor:
        n_rows, vocab = labels.numel(), logits.shape[-1]
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        flat_labels = labels.reshape(-1).clamp(0, vocab - 1)
        flat_mask = mask.reshape(-1).bool()
        lse = torch.empty(n_rows, dtype=compute_dtype, device=logits.device)
        picked = torch.empty_like(lse)
        for start, stop, rows in _chunks(logits, chunk_size):
            lse[start:stop] = torch.logsumexp(rows.to(compute_dtype), dim=-1)
            picked[start:stop] = rows.gather(1, flat_labels[start:stop, None]).squeeze(1)
        out = torch.where(flat_mask, picked - lse, 0.0)
        ctx.save_for_backward(logits, flat_labels, flat_mask, lse)
        ctx.chunk_size = chunk_size
        return out.view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, flat_labels, flat_mask, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_flat = grad_logits.view(-1, logits.shape[-1])
        g = torch.where(flat_mask, grad_out.reshape(-1).to(lse.dtype), 0.0)
        for start, stop, rows in _chunks(logits, ctx.chunk_size):
            g_chunk = g[start:stop, None]
            # torch.sub allocates a fresh compute-dtype tensor, so the in-place ops below
            # never touch the caller's logits (even when they are already float32).
            chunk_grad = torch.sub(rows, lse[start:stop, None]).exp_().mul_(-g_chunk)
            chunk_grad.scatter_add_(1, flat_labels[start:stop, None], g_chunk)
            chunk_grad.masked_fill_(~flat_mask[start:stop, None], 0.0)
            grad_flat[start:stop] = chunk_grad
        return grad_logits, None, None, None


def _check_inputs(logits: Tensor, labels: Tensor, mask: Tensor, chunk_size: int | None) -> int:
    """Validate shapes/dtypes and return the chunk size in rows."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must both be "
            f"{tuple(logits.shape[:2])} to match logits {tuple(logits.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return chunk_size


def token_logps(
    logits: Tensor, labels: Tensor, mask: Tensor, chunk_size: int | None = None
) -> Tensor:
    """Compute per-token log-probabilities ``log softmax(logits)[b, t, labels[b, t]]``, chunked.

    ``labels`` must already be aligned with ``logits`` (``logits[:, t]`` scores
    ``labels[:, t]``); the caller does the causal shift, e.g.
    ``token_logps(out.logits[:, :-1], ids[:, 1:], loss_mask[:, 1:])``.

    The full ``(B, T, V)`` float32 log-softmax is never materialised, in forward or backward:
    rows of the flattened ``(B*T, V)`` logits are processed ``chunk_size`` at a time, and the
    gradient (``onehot(label) - softmax``) is recomputed per chunk from a saved log-sum-exp.

    Args:
        logits: ``(B, T, V)`` logits of any float dtype (e.g. bf16); may be non-contiguous
            such as ``out.logits[:, :-1]``, which is not copied.
        labels: ``(B, T)`` integer token ids aligned with ``logits``. Values at masked
            positions are ignored and may be anything (e.g. -100 or a pad id); they are clamped
            to ``[0, V - 1]`` internally.
        mask: ``(B, T)`` bool or 0/1 tensor, 1 = score this position, 0 = ignore it.
        chunk_size: Rows of ``(B*T, V)`` handled per chunk. ``None`` picks about ``2**24``
            float32 elements per chunk, i.e. ``max(1, 2**24 // V)`` rows.

    Returns:
        ``(B, T)`` float32 log-probabilities (float64 if ``logits`` are float64), exactly 0
        where ``mask`` is 0. Masked positions also receive exactly zero gradient.

    Raises:
        ValueError: If the shapes or dtypes do not match or ``chunk_size`` is not positive.
    """
    rows = _check_inputs(logits, labels, mask, chunk_size)
    return _ChunkedTokenLogps.apply(logits, labels, mask, rows)


def sequence_logps(
    logits: Tensor, labels: Tensor, mask: Tensor, chunk_size: int | None = None
) -> Tensor:
    """Sum each sequence's label log-probabilities over the positions where ``mask`` is 1.

    Computes ``sum_t mask[b, t] * log softmax(logits)[b, t, labels[b, t]]`` with the chunked,
    memory-efficient :func:`token_logps`. ``labels`` must be aligned with ``logits``; the
    caller does the causal shift, preferably on the labels with :func:`next_token_targets`
    (``sequence_logps(out.logits, *next_token_targets(ids, loss_mask))``): slicing the logits
    instead (``out.logits[:, :-1]``) makes autograd allocate one more ``(B, T, V)`` gradient.

    Args:
        logits: ``(B, T, V)`` logits of any float dtype (e.g. bf16).
        labels: ``(B, T)`` integer token ids aligned with ``logits``; values at masked
            positions may be anything (e.g. -100 or a pad id).
        mask: ``(B, T)`` bool or 0/1 tensor, 1 = count this position, 0 = ignore it.
        chunk_size: Rows of ``(B*T, V)`` per chunk; ``None`` picks ``max(1, 2**24 // V)``.

    Returns:
        ``(B,)`` float32 sequence log-probabilities (float64 if ``logits`` are float64).

    Raises:
        ValueError: If the shapes or dtypes do not match or ``chunk_size`` is not positive.
    """
    return token_logps(logits, labels, mask, chunk_size=chunk_size).sum(-1)


def next_token_targets(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Shift the targets, not the logits: labels and mask aligned with full ``(B, T, V)`` logits.

    ``labels[:, t] = input_ids[:, t + 1]`` and ``mask[:, t] = loss_mask[:, t + 1]``; the last
    position has no next token and is masked out. Scoring the full logits against these avoids
    the extra ``(B, T, V)`` gradient buffer that the backward of ``logits[:, :-1]`` allocates.

    Args:
        input_ids: ``(B, T)`` token ids.
        loss_mask: ``(B, T)``, 1 on the tokens to score (completion tokens), 0 elsewhere.

    Returns:
        ``(labels, mask)``, both ``(B, T)``; ``mask`` is bool.
    """
    labels = torch.roll(input_ids, shifts=-1, dims=1)
    mask = torch.roll(loss_mask.to(torch.bool), shifts=-1, dims=1)
    mask[:, -1] = False
    return labels, mask


# --------------------------------------------------------------------------------------------
# Reinforcement-learning helpers (PPO and friends)
# --------------------------------------------------------------------------------------------


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


def _entropy_rows(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Entropy ``(N,)`` of ``softmax(rows)`` for ``(N, V)`` rows, computed in ``dtype``."""
    logp = torch.log_softmax(rows.to(dtype), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Per-token entropy ``-Σ_v p_v log p_v`` of ``p = softmax(logits)``, chunked over rows.

    The ``(B*T, V)`` rows are processed ``chunk_size`` at a time in float32, so only one
    chunk's float32 temporaries exist at once (the caller's logits are never copied or
    upcast as a whole). The result is differentiable; when gradients are needed each chunk is
    wrapped in activation checkpointing, so backward recomputes the chunk's softmax instead of
    keeping every chunk's float32 temporaries alive. For logging, call it under
    ``torch.no_grad()`` on detached logits.

    Args:
        logits: ``(B, T, V)`` logits of any float dtype (e.g. bf16); may be non-contiguous,
            e.g. a slice ``logits[:, p - 1 : p - 1 + r]``. Must be finite.
        chunk_size: Rows of ``(B*T, V)`` handled per chunk. ``None`` picks about ``2**24``
            float32 elements per chunk, i.e. ``max(1, 2**24 // V)`` rows.

    Returns:
        ``(B, T)`` float32 entropies in nats (float64 if ``logits`` are float64). No mask is
        applied; padding positions get the entropy of whatever logits they hold.

    Raises:
        ValueError: If ``logits`` is not 3-D or ``chunk_size`` is not positive.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    batch, seq_len, vocab = logits.shape
    rows = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // max(1, vocab))
    dtype = torch.promote_types(logits.dtype, torch.float32)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for _, _, chunk in _chunks(logits, rows):
        if recompute:
            pieces.append(checkpoint(_entropy_rows, chunk, dtype, use_reentrant=False))
        else:
            pieces.append(_entropy_rows(chunk, dtype))
    if not pieces:
        return logits.new_zeros((batch, seq_len), dtype=dtype)
    return torch.cat(pieces).view(batch, seq_len)


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
