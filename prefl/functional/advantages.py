"""Critic-free advantage estimators over sequence returns, grouped by prompt.

Each prompt is sampled ``k`` times and the ``N = num_prompts * k`` sequence-level returns are
laid out so that the samples of one prompt are *consecutive* blocks of ``k`` (the order of
``prompts.repeat_interleave(k, dim=0)``): returns ``[0:k]`` belong to the first prompt,
``[k:2k]`` to the second, and so on. Each estimator uses the other samples of the same prompt
as its baseline. Only ``torch`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["ADVANTAGE_ESTIMATORS", "grpo", "reinforce_baseline", "rloo"]


def _groups(returns: Tensor, k: int, min_k: int) -> Tensor:
    """View ``(N,)`` returns as ``(N // k, k)`` groups after validating ``k``."""
    if returns.ndim != 1:
        raise ValueError(f"returns must be 1-D (N,), got shape {tuple(returns.shape)}")
    if k < min_k:
        raise ValueError(f"k (samples per prompt) must be >= {min_k}, got {k}")
    if returns.shape[0] % k:
        raise ValueError(f"number of returns {returns.shape[0]} is not divisible by k={k}")
    return returns.view(-1, k)


def rloo(returns: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, arXiv:2402.14740).

    ``A_i = R_i - mean of the other k - 1 returns of i's group``, which equals
    ``k / (k - 1) * (R_i - group mean)``.

    Args:
        returns: ``(N,)`` sequence returns, ``N`` a multiple of ``k``, each prompt's samples
            consecutive.
        k: Samples per prompt, ``>= 2``.

    Returns:
        ``(N,)`` advantages in the order of ``returns``.

    Raises:
        ValueError: If ``returns`` is not 1-D, ``k < 2`` or ``N`` is not divisible by ``k``.
    """
    groups = _groups(returns, k, min_k=2)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (k - 1)
    return (groups - others_mean).view(-1)


def grpo(returns: Tensor, k: int, eps: float = 1e-4) -> Tensor:
    """GRPO's group-normalised advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

    ``A_i = (R_i - mean_g) / (std_g + eps)`` with the group's *unbiased* standard deviation
    (divided by ``k - 1``). A group of equal returns gets advantages of exactly 0.

    Args:
        returns: ``(N,)`` sequence returns, ``N`` a multiple of ``k``, each prompt's samples
            consecutive.
        k: Samples per prompt, ``>= 2``.
        eps: Added to the standard deviation before dividing.

    Returns:
        ``(N,)`` advantages in the order of ``returns``.

    Raises:
        ValueError: If ``returns`` is not 1-D, ``k < 2`` or ``N`` is not divisible by ``k``.
    """
    groups = _groups(returns, k, min_k=2)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, correction=1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def reinforce_baseline(returns: Tensor, k: int) -> Tensor:
    """REINFORCE++-baseline advantages before whitening (Hu 2025, arXiv:2501.03262).

    ``A_i = R_i - mean_g``: the group mean (including ``R_i`` itself) is the baseline. The
    method then whitens these advantages over the whole batch; that step is the caller's (e.g.
    :func:`prefl.functional.whiten`). With ``k = 1`` the group mean would be ``R_i`` itself
    and every advantage 0, so no baseline is used instead: the returns are passed through
    (as a copy) and the caller's global whitening acts as the baseline.

    Args:
        returns: ``(N,)`` sequence returns, ``N`` a multiple of ``k``, each prompt's samples
            consecutive.
        k: Samples per prompt, ``>= 1``.

    Returns:
        ``(N,)`` advantages in the order of ``returns``.

    Raises:
        ValueError: If ``returns`` is not 1-D, ``k < 1`` or ``N`` is not divisible by ``k``.
    """
    groups = _groups(returns, k, min_k=1)
    if k == 1:
        return returns.clone()
    return (groups - groups.mean(-1, keepdim=True)).view(-1)


#: Advantage estimators by name; each is called as ``fn(returns, k)`` with ``(N,)`` returns.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "rloo": rloo,
    "grpo": grpo,
    "reinforce_baseline": reinforce_baseline,
}
