"""A rule-based reward for chat replies, for the RL configs of this folder (``rloo.yaml``).

``configs/smollm2/rloo.yaml`` names it as ``configs.smollm2.rewards:reply_format_reward``, which
imports when the repository root is on ``sys.path``: run ``python -m prefl fit ...`` from the
root (``python -m`` puts the working directory first on the path), or ``PYTHONPATH=. prefl fit
...``. It is a plain function ``fn(prompts, completions) -> list[float]`` (prefl's reward-function
signature) and imports only the standard library.

It rewards the *form* of a reply, not what it says, so it needs no model and cannot be fooled
into rewarding harm by a learned scorer's blind spots; it is meant as a sanity-level RL signal
(does the loop move the policy where the reward points?) and as a regulariser beside a reward
model, not as a stand-in for human preference. Per reply, in ``[-1, 1]``:

- **length**: +1 for 4 to 60 words, falling linearly to 0 at 0 and at 120 words (one-word
  answers and rambling both score less);
- **repetition**: minus the share of repeated word 3-grams (a reply looping on one phrase
  loses up to 1);
- **role leakage**: -1 when the reply writes the next turn itself (``Human:``, ``User:``,
  ``Assistant:`` at the start of a line, or a leftover chat-template marker such as
  ``<|im_start|>``), whatever else it does.

Whether the reply ended (emitted EOS) is not judged here: PPOModule's ``no_eos_score`` replaces
the score of replies that never end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Replies of this many words (inclusive) get the full length score.
GOOD_WORDS = (4, 60)
#: At this many words the length score has fallen to 0.
MAX_WORDS = 120
_LEAK = re.compile(r"(^|\n)\s*(Human|User|Assistant)\s*:|<\|im_(start|end)\|>", re.IGNORECASE)


def length_score(words: int) -> float:
    """1 inside :data:`GOOD_WORDS`, linear down to 0 at 0 words and at :data:`MAX_WORDS`."""
    low, high = GOOD_WORDS
    if words < low:
        return words / low
    if words <= high:
        return 1.0
    return max(0.0, (MAX_WORDS - words) / (MAX_WORDS - high))


def repetition(words: list[str], n: int = 3) -> float:
    """Share of the reply's word ``n``-grams that repeat an earlier one (0 = none repeats)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def reply_format_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Score each reply's form in ``[-1, 1]`` (module doc): length minus repetition, or -1 for
    a reply that writes another speaker's turn.

    Args:
        prompts: The prompts (unused: the rule judges the reply alone).
        completions: The decoded replies, one per prompt.

    Returns:
        One float per reply.
    """
    del prompts
    scores = []
    for text in completions:
        if _LEAK.search(text):
            scores.append(-1.0)
            continue
        words = text.lower().split()
        scores.append(max(-1.0, length_score(len(words)) - repetition(words)))
    return scores
