"""The rule-based reward of the RL configs (``configs/smollm2/rewards.py``), by hand-made replies.

Expected values from the rules in its module doc: the length score is 1 for 4 to 60 words, w/4
below, (120 - w)/60 above; minus the share of repeated word 3-grams; -1 for a reply that writes
another speaker's turn.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rewards():
    """The module, imported by the dotted name the configs use (repository root on the path)."""
    sys.path.insert(0, str(ROOT))
    try:
        yield importlib.import_module("configs.smollm2.rewards")
    finally:
        sys.path.remove(str(ROOT))


def test_length_and_repetition(rewards):
    fn = rewards.reply_format_reward
    ten = "I am not able to help with that request, sorry."
    assert fn(["p"], [ten]) == [1.0]  # 10 distinct words
    assert fn(["p"], ["No."]) == [0.25]  # 1 word: 1/4
    assert fn(["p"], [""]) == [0.0]
    ninety = " ".join(f"w{i}" for i in range(90))
    assert fn(["p"], [ninety]) == [pytest.approx(0.5)]  # (120 - 90) / 60
    loop = " ".join(["go to the shop"] * 5)  # 20 words, 18 trigrams of which 4 distinct
    assert fn(["p"], [loop]) == [pytest.approx(1 - (1 - 4 / 18))]


def test_writing_the_next_turn_scores_minus_one(rewards):
    fn = rewards.reply_format_reward
    replies = ["Sure.\nHuman: and then?", "Fine.\n  user: next", "ok <|im_start|>assistant"]
    assert fn(["p"] * 3, replies) == [-1.0, -1.0, -1.0]
    assert fn(["p"], ["The human: a social animal, some say."]) == [1.0]  # not at a line start


def test_scores_stay_in_range(rewards):
    replies = ["a a a a a a a a a a a a", "x " * 500, "one two three four"]
    assert all(-1.0 <= s <= 1.0 for s in rewards.reply_format_reward(["p"] * 3, replies))
