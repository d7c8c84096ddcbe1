"""The judge's both-orders rule (prefl/data/judging.py) with scripted judges: a pair is kept only
when the judge prefers the same answer shown first and shown second; the margin is
``p_xy - p_yx``; templates are checked."""

from __future__ import annotations

import pytest

from prefl.data.judging import (
    JUDGE_TEMPLATE,
    agreed_margin,
    check_template,
    judge_pairs,
    judge_request,
    prompt_text,
)
from prefl.data.pairs import LabelCounts, SampleRow

TEMPLATE = "Q: {prompt}\nA: {first}\nB: {second}"


def row(completions, prompt="Q?", key="r"):
    indices = list(range(len(completions)))
    return SampleRow("s.jsonl", 1, key, prompt, list(completions), indices=indices)


def scripted(quality: dict[str, float], bias: float = 0.0):
    """A judge that reads the two answers back out of its request and prefers the one of higher
    ``quality``: ``p_first = 1/2 + (q_first - q_second)/2 + bias``, clipped to [0, 1]; ``bias``
    is its pull towards whatever is shown first. Records every request it is asked."""
    asked = []

    def ask(requests):
        out = []
        for messages in requests:
            assert len(messages) == 1 and messages[0]["role"] == "user"
            text = messages[0]["content"]
            asked.append(text)
            first = text.split("\nA: ")[1].split("\nB: ")[0]
            second = text.split("\nB: ")[1]
            p = 0.5 + (quality[first] - quality[second]) / 2 + bias
            out.append(min(1.0, max(0.0, p)))
        return out

    ask.asked = asked
    return ask


def test_both_orders_agree_keeps_the_pair_with_the_margin():
    """Qualities 0.6 and 0.2: p_xy = 0.7 and p_yx = 0.3, so the margin is 0.4."""
    ask = scripted({"good": 0.6, "bad": 0.2})
    counts = LabelCounts()
    pairs = judge_pairs([row(["bad", "good"])], ask, counts, TEMPLATE)
    assert pairs == [[(1, 0, pytest.approx(0.4, abs=1e-12))]]
    assert counts.ties == 0
    assert ask.asked == ["Q: Q?\nA: bad\nB: good", "Q: Q?\nA: good\nB: bad"]  # both orders


def test_a_position_biased_judge_gives_a_tie():
    """The same judge pulled +0.3 towards the first answer prefers whichever is first in both
    orders (p = 0.5 + 0.2 + 0.3 = 1.0 and 0.5 - 0.2 + 0.3 = 0.6): the orders disagree, a tie."""
    ask = scripted({"good": 0.6, "bad": 0.2}, bias=0.3)
    counts = LabelCounts()
    assert judge_pairs([row(["good", "bad"])], ask, counts, TEMPLATE) == [[]]
    assert counts.ties == 1


def test_a_bias_smaller_than_the_difference_still_agrees():
    """Bias 0.1 against a quality difference of 0.4: p_xy = 0.8, p_yx = 0.4, margin 0.4."""
    ask = scripted({"good": 0.6, "bad": 0.2}, bias=0.1)
    pairs = judge_pairs([row(["good", "bad"])], ask, LabelCounts(), TEMPLATE)
    assert pairs == [[(0, 1, pytest.approx(0.4, abs=1e-12))]]


@pytest.mark.parametrize(
    ("p_xy", "p_yx", "expected"),
    [(0.9, 0.2, 0.7), (0.1, 0.8, -0.7), (0.9, 0.6, None), (0.3, 0.4, None), (0.5, 0.2, None)],
)
def test_agreed_margin(p_xy, p_yx, expected):
    margin = agreed_margin(p_xy, p_yx)
    assert margin == (None if expected is None else pytest.approx(expected, abs=1e-12))


def test_best_against_worst_by_agreed_wins_over_k_answers():
    """Three answers of qualities 0.9 > 0.5 > 0.1: every comparison agrees; wins 2, 1, 0, so
    the pair is best (0.9) against worst (0.1) with margin p_xy - p_yx = 0.9 - 0.1 = 0.8.
    Identical texts are never sent to the judge."""
    ask = scripted({"hi": 0.9, "mid": 0.5, "lo": 0.1})
    counts = LabelCounts()
    pairs = judge_pairs([row(["mid", "lo", "hi", "lo"])], ask, counts, TEMPLATE)
    assert pairs == [[(2, 1, pytest.approx(0.8, abs=1e-12))]]
    assert len(ask.asked) == 2 * 5  # 6 pairs, less the identical "lo"/"lo"


def test_min_margin_keeps_each_agreed_comparison_over_it():
    """Qualities 0.6 > 0.4 > 0.2 and a bias of 0.15 towards the first answer: hi/mid and mid/lo
    (p = 0.5 +- 0.1 + 0.15: 0.75 and 0.55) disagree, two ties; hi/lo (0.5 +- 0.2 + 0.15: 0.85
    and 0.45) agrees, margin 0.85 - 0.45 = 0.4."""
    ask = scripted({"hi": 0.6, "mid": 0.4, "lo": 0.2}, bias=0.15)
    counts = LabelCounts()
    pairs = judge_pairs([row(["lo", "mid", "hi"])], ask, counts, TEMPLATE, min_margin=0.0)
    assert pairs == [[(2, 0, pytest.approx(0.4, abs=1e-12))]]
    assert counts.ties == 2


def test_no_requests_for_rows_of_identical_answers():
    ask = scripted({"same": 0.5})
    counts = LabelCounts()
    assert judge_pairs([row(["same", "same"])], ask, counts, TEMPLATE) == [[]]
    assert ask.asked == [] and counts.ties == 1


def test_default_template_and_chat_prompts():
    messages = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello"}]
    assert prompt_text(messages) == "User: Hi\n\nAssistant: Hello"
    request = judge_request(JUDGE_TEMPLATE, messages, " one ", "two")
    text = request[0]["content"]
    assert "[Answer A]\none\n\n[Answer B]\ntwo\n\n" in text
    assert text.startswith("You compare two answers") and text.endswith("A or B.")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{prompt} {first}", r"expected the fields \['first', 'prompt', 'second'\]"),
        ("{prompt} {first} {second} {other}", "found"),
        ("{prompt} {first} {second} {", "judge template"),
    ],
)
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        check_template(template)
    assert check_template("{{x}} {prompt} {first} {second}")
