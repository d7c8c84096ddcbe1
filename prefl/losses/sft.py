"""The supervised fine-tuning loss: next-token negative log-likelihood on completion tokens."""

from __future__ import annotations

import torch

from prefl.functional import token_logps


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-mean NLL of ``labels`` over ``mask``, plus per-token stats for metrics.

    Args:
        logits: ``(B, T, V)`` logits, *aligned* with ``labels`` (the caller shifts:
            ``logits[:, :-1]`` against ``input_ids[:, 1:]``).
        labels: ``(B, T)`` target ids.
        mask: ``(B, T)``, 1 on completion tokens that count, 0 on prompt and padding.

    Returns:
        ``(loss, n_tokens, n_correct)``: the mean NLL over masked tokens (0 when none), the
        number of masked tokens, and how many of them the argmax of ``logits`` predicts.
    """
    mask = mask.to(torch.bool)
    nll = -token_logps(logits, labels, mask)
    n_tokens = mask.sum()
    loss = nll.sum() / n_tokens.clamp(min=1)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss, n_tokens, correct
