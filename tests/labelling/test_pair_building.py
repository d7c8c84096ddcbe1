"""Reading samples files and choosing pairs (prefl/data/pairs.py): best against worst, every pair
over a margin, ties, conversational rows, and bad input named by file and line."""

from __future__ import annotations

import json

import pytest
from conftest import write_samples

from prefl.data.pairs import LabelCounts, choose_pairs, pair_row, read_samples
from prefl.data.validate import DataFileError

TEXTS = ["a", "b", "c"]


def test_best_against_worst_is_one_pair_with_the_score_difference():
    counts = LabelCounts()
    assert choose_pairs(TEXTS, [0.25, 1.0, -0.5], counts) == [(1, 2, 1.5)]
    assert counts.ties == 0


def test_the_first_best_and_first_worst_are_taken():
    assert choose_pairs(["a", "b", "c", "d"], [1.0, 0.0, 1.0, 0.0], LabelCounts()) == [(0, 1, 1.0)]


@pytest.mark.parametrize(
    ("texts", "scores"),
    [(["a", "b"], [0.5, 0.5]), (["same", "same"], [1.0, 0.0]), (["a", "b", "c"], [2.0] * 3)],
    ids=["equal scores", "identical texts", "all equal"],
)
def test_ties_give_no_pair_and_are_counted(texts, scores):
    counts = LabelCounts()
    assert choose_pairs(texts, scores, counts) == []
    assert counts.ties == 1


def test_min_margin_keeps_every_pair_at_least_that_far_apart():
    """Scores 0, 0.5, 2 (and a duplicate of text "a" scored 0): differences 0.5, 2, 1.5, and the
    duplicate pair is a tie whatever its scores; at min_margin 1.5 the 0.5 pair is under it
    (1.5 itself counts: ``>=``)."""
    texts, scores = ["a", "b", "c", "a"], [0.0, 0.5, 2.0, 0.0]
    counts = LabelCounts()
    pairs = choose_pairs(texts, scores, counts, min_margin=1.5)
    assert pairs == [(2, 0, 2.0), (2, 1, 1.5), (2, 3, 2.0)]
    assert (counts.ties, counts.below_margin) == (1, 2)  # (a, a); (a, b) and (b, a)


def test_min_margin_zero_keeps_every_decided_pair_oriented_by_score():
    counts = LabelCounts()
    pairs = choose_pairs(["x", "y", "z"], [1.0, 3.0, 1.0], counts, min_margin=0.0)
    assert pairs == [(1, 0, 2.0), (1, 2, 2.0)]
    assert (counts.ties, counts.below_margin) == (1, 0)


def test_a_verdict_decides_instead_of_the_scores():
    """A judge's verdict: the best by score is kept only if the verdict favours it."""
    counts = LabelCounts()
    against = choose_pairs(["x", "y"], [1.0, 0.0], counts, verdict=lambda i, j: None)
    assert against == [] and counts.ties == 1
    favours = choose_pairs(["x", "y"], [1.0, 0.0], counts, verdict=lambda i, j: 0.25)
    assert favours == [(0, 1, 0.25)]


def test_pair_rows_keep_the_prompts_format():
    text = pair_row("Q?", "yes", "no", 0.5, "reward-fn:toy", id="r/0-1")
    assert text == {
        "prompt": "Q?",
        "chosen": "yes",
        "rejected": "no",
        "margin": 0.5,
        "source": "reward-fn:toy",
        "id": "r/0-1",
    }
    chat = pair_row([{"role": "user", "content": "Q?"}], "yes", "no", 1.0, "human")
    assert chat["prompt"] == [{"role": "user", "content": "Q?"}]
    assert chat["chosen"] == [{"role": "assistant", "content": "yes"}]
    assert chat["rejected"] == [{"role": "assistant", "content": "no"}]


def test_read_samples_counts_skipped_rows_and_blank_completions(tmp_path):
    path = write_samples(
        tmp_path / "s.jsonl",
        [
            {"id": 7, "prompt": "p1", "completions": ["x", "  ", "y"], "scores": [1, 2, 3]},
            {"prompt": "p2", "completions": []},
            {"prompt": "p3", "completions": ["only"]},
            {"prompt": "p4", "completions": ["z", "\n"]},
            {"prompt": "p5", "completions": ["u", "v"]},
            {"prompt": "p6", "completions": ["u", "v"], "meta": {"row": 17}},
        ],
    )
    counts = LabelCounts()
    rows = read_samples([path], counts)
    assert [r.key for r in rows] == ["7", "s.jsonl:5", "17"]  # id, line, SampleWriter's row
    assert rows[0].completions == ["x", "y"] and rows[0].scores == [1.0, 3.0]
    assert rows[0].indices == [0, 2] and rows[0].comparison_id(1, 0) == "7/0-2"
    assert rows[0].meta == {"model": "toy", "seed": 0}
    assert counts.prompts == 6 and counts.blank == 1
    assert dict(counts.skipped) == {
        "no completions": 1,
        "one completion": 1,
        "fewer than two non-blank completions": 1,
    }
    counts.pairs, counts.ties = 1, 1
    assert counts.line() == (
        "prefl pairs: 6 prompts read, 1 pairs written, 1 ties, 3 rows skipped (1 no "
        "completions, 1 one completion, 1 fewer than two non-blank completions), 1 blank "
        "completions left out"
    )


def test_a_folder_is_read_file_by_file_in_name_order(tmp_path):
    write_samples(tmp_path / "b.jsonl", [{"prompt": "second", "completions": ["x", "y"]}])
    write_samples(tmp_path / "a.jsonl", [{"prompt": "first", "completions": ["x", "y"]}])
    (tmp_path / "notes.txt").write_text("not a samples file")
    rows = read_samples([tmp_path], LabelCounts())
    assert [r.prompt for r in rows] == ["first", "second"]


GOOD = json.dumps({"prompt": "p", "completions": ["x", "y"]})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "p", "completions": ["x", ', "invalid JSON at column 38: Expecting value"),
        ("[1, 2]", "expected a JSON object (one row per line), got list"),
        ('{"prompt": "p"}', "no 'completions'"),
        ('{"prompt": 3, "completions": []}', "'prompt': expected a text or messages, got int"),
        ('{"prompt": [{"role": "bot", "content": "hi"}], "completions": []}', "'prompt' message 0"),
        ('{"prompt": "p", "completions": ["x", 1]}', "'completions': expected a list of texts"),
        ('{"prompt": "p", "completions": ["x"], "scores": [1, 2]}', "'scores': expected 1 numbers"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, line, problem):
    path = tmp_path / "samples.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(DataFileError) as err:
        read_samples([path], LabelCounts())
    assert str(err.value).startswith(f"dataset file {str(path)!r}, line 3: ")
    assert problem in str(err.value)


def test_text_and_chat_prompts_cannot_be_mixed(tmp_path):
    path = write_samples(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "text", "completions": ["x", "y"]},
            {"prompt": [{"role": "user", "content": "hi"}], "completions": ["x", "y"]},
        ],
    )
    with pytest.raises(DataFileError, match="line 2: a conversation, but mixed.jsonl line 1"):
        read_samples([path], LabelCounts())


def test_missing_samples_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_samples([tmp_path / "nothing.jsonl"], LabelCounts())
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.jsonl"):
        read_samples([tmp_path], LabelCounts())
