"""Tests for prefl.tasks.toy: determinism, the oracle reward, the exact generator log-probability,
the prompt split, the toy vocabulary against the toy tokenizer, and the JSONL export.

Hand-derived values (prompt "happily , the movie was", mood positive, category probabilities
(pos, neg, neu) = (0.5, 0.1, 0.4), 10 positive / 12 negative / 18 neutral words, lengths 3..10
uniform so P(length) = 1/8):

    log p("great bad the") = log(1/8) + log(0.5/10) + log(0.1/12) + log(0.4/18)
"""

from __future__ import annotations

import itertools
import json
import math
import random
import runpy
import subprocess
import sys

import pytest

from prefl.data.tokenizers import build_toy_tokenizer
from prefl.tasks import toy

HAPPY = "happily , the movie was"
SAD = "sadly , the film is"
NEUTRAL_PROMPT = "honestly , the plot felt"


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("make", [toy.sft_rows, toy.pair_rows, toy.prompt_rows])
def test_rows_same_seed_same_rows_different_seed_different_rows(make):
    a, b, c = make(30, seed=0), make(30, seed=0), make(30, seed=1)
    assert len(a) == len(c) == 30
    assert a == b
    assert a != c


@pytest.mark.parametrize("make", [toy.sft_rows, toy.pair_rows, toy.prompt_rows])
def test_held_out_flag_switches_the_prompt_set(make):
    train, held_out = toy.split_prompts()
    rows_train = make(40, seed=3)
    rows_held = make(40, seed=3, held_out=True)
    assert {r["prompt"] for r in rows_train} <= set(train)
    assert {r["prompt"] for r in rows_held} <= set(held_out)


def test_prompt_rows_none_returns_each_prompt_once():
    train, held_out = toy.split_prompts()
    assert [r["prompt"] for r in toy.prompt_rows()] == train
    assert [r["prompt"] for r in toy.prompt_rows(held_out=True)] == held_out


def test_vocabulary_and_prompts_are_fixed():
    vocab = toy.vocabulary()
    assert len(vocab) == len(set(vocab)) == 9 + 8 + 4 + 2 + 10 + 12 + 18
    assert vocab[:3] == ["happily", "luckily", "gladly"]
    assert vocab[-1] == "then"
    prompts = toy.all_prompts()
    assert len(prompts) == 9 * 8 * 4 == 288
    assert prompts[0] == HAPPY
    assert prompts[-1] == "overall , the cast seemed"
    # the lexicon's categories are disjoint (generator_logprob relies on it)
    assert not set(toy.POSITIVE) & set(toy.NEGATIVE)
    assert not (set(toy.POSITIVE) | set(toy.NEGATIVE)) & set(toy.NEUTRAL)


# --------------------------------------------------------------------------- the prompt split


def test_split_is_disjoint_covers_everything_and_is_stratified():
    train, held_out = toy.split_prompts()
    assert len(train) == 216 and len(held_out) == 72
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(toy.all_prompts())
    for opener in toy.OPENERS:
        assert sum(p.split()[0] == opener for p in held_out) == 8  # round(32 * 0.25)


def test_split_seed():
    assert toy.split_prompts(0) == toy.split_prompts(0)
    assert toy.split_prompts(0)[1] != toy.split_prompts(1)[1]


# --------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("great good bad", 1 / 3),
        ("", 0.0),
        ("   ", 0.0),
        ("the story and", 0.0),
        ("awful", -1.0),
        ("superb fresh", 1.0),
        ("bad dull the very", -0.5),
        ("great , bad .", 0.0),
    ],
)
def test_oracle_reward_hand_values(completion, expected):
    assert toy.oracle_reward(HAPPY, completion) == pytest.approx(expected, abs=1e-12)


def test_oracle_reward_ignores_the_prompt():
    assert toy.oracle_reward(SAD, "great good bad") == toy.oracle_reward(HAPPY, "great good bad")


def test_oracle_rewards_batch_form():
    got = toy.oracle_rewards([HAPPY, SAD, NEUTRAL_PROMPT], ["great", "bad the", ""])
    assert got == pytest.approx([1.0, -0.5, 0.0], abs=1e-12)
    with pytest.raises(ValueError):
        toy.oracle_rewards([HAPPY], ["great", "bad"])


def test_corpus_reward():
    rows = [{"prompt": HAPPY, "completion": "great good"}, {"prompt": SAD, "completion": "bad the"}]
    assert toy.corpus_reward(rows) == pytest.approx(0.25, abs=1e-12)


def test_pairs_prefer_the_higher_oracle_reward():
    rows = toy.pair_rows(200, seed=5)
    assert len(rows) == 200
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert toy.oracle_reward(row["prompt"], row["chosen"]) > toy.oracle_reward(
            row["prompt"], row["rejected"]
        )


# --------------------------------------------------------------------------- the generator


def test_prompt_mood():
    assert toy.prompt_mood(HAPPY) == "positive"
    assert toy.prompt_mood(SAD) == "negative"
    assert toy.prompt_mood(NEUTRAL_PROMPT) == "neutral"
    with pytest.raises(ValueError, match="unknown opener"):
        toy.prompt_mood("hello , the movie was")


def test_generator_logprob_hand_value():
    expected = math.log(1 / 8) + math.log(0.5 / 10) + math.log(0.1 / 12) + math.log(0.4 / 18)
    assert toy.generator_logprob(HAPPY, "great bad the") == pytest.approx(expected, abs=1e-12)
    # negative mood (0.2, 0.4, 0.4): the same words weigh differently
    expected_sad = math.log(1 / 8) + math.log(0.2 / 10) + math.log(0.4 / 12) + math.log(0.4 / 18)
    assert toy.generator_logprob(SAD, "great bad the") == pytest.approx(expected_sad, abs=1e-12)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "great good",  # too short
        " ".join(["good"] * 11),  # too long
        "great movie good",  # a subject is not in the lexicon
        "great , good",  # punctuation is not in the lexicon
        "great xyzzy good",
    ],
)
def test_generator_logprob_impossible_completions(completion):
    assert toy.generator_logprob(HAPPY, completion) == -math.inf


@pytest.mark.parametrize("prompt", [HAPPY, SAD, NEUTRAL_PROMPT])
def test_generator_probabilities_of_all_three_word_completions_sum_to_p_length(prompt):
    lexicon = [*toy.POSITIVE, *toy.NEGATIVE, *toy.NEUTRAL]
    total = math.fsum(
        math.exp(toy.generator_logprob(prompt, " ".join(words)))
        for words in itertools.product(lexicon, repeat=3)
    )
    assert total == pytest.approx(1 / 8, abs=1e-9)


def test_samples_lie_in_the_generator_support():
    for row in toy.sft_rows(100, seed=2):
        n_words = len(row["completion"].split())
        assert toy.MIN_WORDS <= n_words <= toy.MAX_WORDS
        assert math.isfinite(toy.generator_logprob(row["prompt"], row["completion"]))


def test_sample_completion_is_seeded():
    draws = [toy.sample_completion(HAPPY, random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    others = {toy.sample_completion(HAPPY, random.Random(seed)) for seed in range(8, 12)}
    assert others != {draws[0]}


# --------------------------------------------------------------------------- tokenizer coverage


def test_every_toy_word_and_prompt_is_in_the_toy_tokenizer():
    tok = build_toy_tokenizer()
    unk = tok.unk_token_id
    assert unk == 3
    for word in toy.vocabulary():
        assert tok.convert_tokens_to_ids(word) != unk, word
    ids = tok(" ".join(toy.vocabulary()), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(toy.vocabulary()) and unk not in ids
    for prompt in toy.all_prompts():
        assert unk not in tok(prompt)["input_ids"]


# --------------------------------------------------------------------------- splits and export


def test_toy_splits_sizes_and_unknown_mode():
    splits = toy.toy_splits("prompts")
    assert {k: len(v) for k, v in splits.items()} == toy.TOY_SIZES["prompts"]
    _, held_out = toy.split_prompts()
    assert {r["prompt"] for r in splits["validation"] + splits["test"]} <= set(held_out)
    with pytest.raises(ValueError, match="unknown toy mode"):
        toy.toy_splits("dpo")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_export")
    return out, toy.export_jsonl(out)


def test_export_jsonl_reads_back_with_datasets(exported, tmp_path):
    import datasets

    out, paths = exported
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{m}_{s}.jsonl" for m in toy.ROWS_BY_MODE for s in toy.TOY_SIZES[m])
    columns = {
        "sft": ["prompt", "completion"],
        "pairs": ["prompt", "chosen", "rejected"],
        "prompts": ["prompt"],
    }
    for mode, cols in columns.items():
        files = {s: str(out / f"{mode}_{s}.jsonl") for s in ("train", "validation", "test")}
        ds = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "cache"))
        for split, n in toy.TOY_SIZES[mode].items():
            assert ds[split].column_names == cols
            assert ds[split].num_rows == n
    first = json.loads((out / "pairs_train.jsonl").read_text().splitlines()[0])
    assert first == toy.pair_rows(1, seed=0)[0]


def test_module_cli_writes_the_same_files_in_a_fresh_process(exported, tmp_path):
    out, paths = exported
    result = subprocess.run(
        [sys.executable, "-m", "prefl.tasks.toy", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 9
    for path in paths:  # same bytes: the seeds do not depend on the process (hash seed, ...)
        assert (tmp_path / "cli" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.filterwarnings("ignore:.*found in sys.modules.*:RuntimeWarning")
def test_module_cli_usage(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["toy"])
    with pytest.raises(SystemExit, match="usage"):
        runpy.run_module("prefl.tasks.toy", run_name="__main__")
