"""A reward function for the ``prefl pairs --reward-fn label_rewards:word_count`` tests: the
number of words of each completion; it keeps the prompts it was given in :data:`SEEN`."""

from __future__ import annotations

from collections.abc import Sequence

SEEN: list[str] = []


def word_count(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """One score per completion: its number of words."""
    SEEN.extend(prompts)
    return [float(len(c.split())) for c in completions]
