"""Issue 15, defect 4: completions are tokenized after their prompt (prefl.data.boundary).

With a Llama-2 / Mistral-v0.1 style SentencePiece tokenizer (built offline, see
``offline_tokenizers``), a completion tokenized on its own starts with a lone ``"▁"`` that
``prompt + completion`` tokenized as one text never has. Here: completion ids are exactly the
joint tokenization's suffix; byte-level BPE output is what it was; a merge across the boundary
follows rule 3 of prefl.data.boundary and is counted; truncation still cuts prompts from the
left (BOS kept) and completions from the right.
"""

from __future__ import annotations

import logging

import datasets
import pytest
from offline_tokenizers import (
    byte_level_bpe,
    encode_alone,
    lone_metaspace_id,
    sentencepiece_bpe,
    tokenize_rows,
)

from prefl.data import PreferenceDataModule
from prefl.data.boundary import encode_rows, separator, shared_prefix_length
from prefl.data.formats import split_implicit
from prefl.data.tokenize import encode_prompts
from prefl.data.tokenizers import build_toy_tokenizer

H, A = "\n\nHuman:", "\n\nAssistant:"
HH_ROWS = [  # implicit HH-style transcripts written for these tests
    (f"{H} How do I bake bread?{A}", " Mix flour, water and yeast.", " I don't know."),
    (f"{H} Hi there.{A} Hello! How can I help?{H} Tell me a joke.{A}", " Why did the chicken "
     "cross the road?", " I don't know."),
    (f"{H} What is the capital of France?{A}", " Paris.", " Sure thing, it is Paris."),
    (f"{H} Can you help me?{A}", " Sure, I am happy to help.", " Hello world!"),
]  # fmt: skip
INST_ROWS = [
    ("[INST] Tell me a joke. [/INST]", " Why did the chicken cross the road?", " I don't know."),
    ("[INST] Write a poem about the sea. [/INST]", " The sea is wide.", " Sure thing."),
]


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_bpe()


@pytest.fixture(scope="module")
def sp_first():
    return sentencepiece_bpe(legacy=False)


@pytest.fixture(scope="module")
def bl():
    return byte_level_bpe()


def rows_in(fmt: str, mode: str, triples) -> list[dict]:
    if fmt == "implicit":
        return [{"chosen": p + c, "rejected": p + r} for p, c, r in triples]
    if mode == "sft":
        return [{"prompt": p, "completion": c} for p, c, _ in triples]
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]


def completions_of(out: dict, mode: str) -> list[list[list[int]]]:
    names = {"pairs": ["chosen_ids", "rejected_ids"], "sft": ["completion_ids"]}[mode]
    return [list(c) for c in zip(*(out[n] for n in names), strict=True)]


def texts_of(mode: str, triples) -> list[tuple[str, list[str]]]:
    return [(p, [c, r][: 2 if mode == "pairs" else 1]) for p, c, r in triples]


def test_the_defect_sentencepiece_alone_starts_with_a_lone_piece(sp, sp_first, bl):
    lone = lone_metaspace_id(sp)
    alone = sp(" Sure thing", add_special_tokens=False)["input_ids"]
    joint = sp(f"{A} Sure thing", add_special_tokens=False)["input_ids"]
    assert alone[0] == lone and lone not in joint  # the stray "▁" of issue 15
    # prefl's encode_completions (on their own) still shows it; encode_rows does not
    assert encode_alone(sp, [" Sure thing"], chat=False)[0][0] == lone
    assert encode_rows(sp, [A], [[" Sure thing"]], chat=False).completions[0][0][0] != lone
    # Metaspace(prepend_scheme="first") and byte-level BPE agree either way
    for tok, text in ((sp_first, " Sure thing"), (bl, " Sure thing")):
        alone = tok(text, add_special_tokens=False)["input_ids"]
        assert tok(A + text, add_special_tokens=False)["input_ids"][-len(alone) :] == alone


@pytest.mark.parametrize("mode", ["pairs", "sft"])
@pytest.mark.parametrize("fmt", ["explicit", "implicit"])
@pytest.mark.parametrize("triples", [HH_ROWS, INST_ROWS], ids=["hh", "inst"])
def test_sentencepiece_completions_are_the_joint_suffix(sp, mode, fmt, triples):
    out = tokenize_rows(sp, mode, rows_in(fmt, mode, triples), fmt)
    lone, eos = lone_metaspace_id(sp), sp.eos_token_id
    assert out["boundary_merged"] == [False] * len(triples)
    for prompt_ids, completions, (prompt, texts) in zip(
        out["prompt_ids"], completions_of(out, mode), texts_of(mode, triples), strict=True
    ):
        assert prompt_ids == sp(prompt)["input_ids"]  # with its BOS
        for ids, text in zip(completions, texts, strict=True):
            assert ids[0] != lone
            assert prompt_ids + ids == sp(prompt + text)["input_ids"] + [eos]


@pytest.mark.parametrize("mode", ["pairs", "sft"])
def test_llama2_chat_rows_are_the_rendered_conversation(sp, mode):
    rows = [
        {
            "prompt": [{"role": "user", "content": p.removeprefix("[INST] ")[:-8]}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "completion": [{"role": "assistant", "content": c}],
        }
        for p, c, r in INST_ROWS
    ]
    out = tokenize_rows(sp, mode, rows, "conversational")
    assert out["boundary_merged"] == [False, False]
    for row, prompt_ids, completions in zip(
        rows, out["prompt_ids"], completions_of(out, mode), strict=True
    ):
        assert prompt_ids.count(sp.bos_token_id) == 1 and prompt_ids[0] == sp.bos_token_id
        for ids, key in zip(completions, ["chosen", "rejected"][: len(completions)], strict=True):
            full = sp.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            assert prompt_ids + ids == sp(full, add_special_tokens=False)["input_ids"]
            assert ids[0] != lone_metaspace_id(sp) and ids.count(sp.eos_token_id) == 1


@pytest.mark.parametrize("mode", ["pairs", "sft", "prompts"])
def test_byte_level_output_is_unchanged(bl, mode):
    rows = rows_in("explicit", mode, HH_ROWS + INST_ROWS)
    if mode == "prompts":
        rows = [{"prompt": r["prompt"]} for r in rows]
    out = tokenize_rows(bl, mode, rows, "explicit")
    assert out["boundary_merged"] == [False] * len(rows)
    assert out["prompt_ids"] == [bl(r["prompt"])["input_ids"] for r in rows]
    if mode != "prompts":  # the old rule: each completion on its own, plus EOS
        for completions, (_, texts) in zip(
            completions_of(out, mode), texts_of(mode, HH_ROWS + INST_ROWS), strict=True
        ):
            assert completions == encode_alone(bl, texts, chat=False)


def test_byte_level_chatml_rows_are_unchanged(bl):
    rows = [
        {
            "prompt": [{"role": "user", "content": p.strip()}],
            "chosen": [{"role": "assistant", "content": c.strip()}],
            "rejected": [{"role": "assistant", "content": r.strip()}],
        }
        for p, c, r in HH_ROWS + INST_ROWS
    ]
    out = tokenize_rows(bl, "pairs", rows, "conversational")
    assert out["boundary_merged"] == [False] * len(rows)
    for i, row in enumerate(rows):
        prompt = bl.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert out["prompt_ids"][i] == bl(prompt, add_special_tokens=False)["input_ids"]
        for key in ("chosen", "rejected"):
            full = bl.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            old = encode_alone(bl, [full[len(prompt) :]], chat=True)[0]
            assert out[f"{key}_ids"][i] == old and old[-1] == bl.eos_token_id


def test_toy_rows_tokenize_as_before():
    tok = build_toy_tokenizer()
    assert separator(tok) == " "  # word-level: "was" + "great" are two words
    rows = [{"prompt": "happily , the movie was", "chosen": "great fun", "rejected": "bad"}]
    out = tokenize_rows(tok, "pairs", rows, "explicit")
    assert out["prompt_ids"] == encode_prompts(tok, ["happily , the movie was"])
    assert out["chosen_ids"] == encode_alone(tok, ["great fun"], chat=False)
    assert out["boundary_merged"] == [False]


def test_shared_prefix_length():
    assert shared_prefix_length([1, 2, 3], [[1, 2, 3, 4], [1, 2, 3]]) == 3
    assert shared_prefix_length([1, 2, 3], [[1, 2, 9], [1, 2, 3, 4]]) == 2
    assert shared_prefix_length([1, 2, 3], [[1, 2, 3, 4], [1, 7]]) == 1
    assert shared_prefix_length([1, 2, 3], []) == 3


@pytest.mark.parametrize(
    ("which", "prompt", "completion"),
    [("sp", "[INST] Tell me a joke. [/INST] ", "Sure thing."), ("bl", "Hello wor", "ld!")],
)
def test_merged_boundary_follows_rule_3(sp, bl, which, prompt, completion):
    tok = {"sp": sp, "bl": bl}[which]
    alone = tok(prompt)["input_ids"]
    joint = tok(prompt + completion)["input_ids"]
    assert joint[: len(alone)] != alone  # a token merges across the boundary
    other = " No."  # a rejected reply whose joint keeps the prompt's ids
    out = tokenize_rows(
        tok, "pairs", [{"prompt": prompt, "chosen": completion, "rejected": other}], "explicit"
    )
    assert out["boundary_merged"] == [True]
    n = shared_prefix_length(alone, [joint])
    assert out["prompt_ids"] == [alone[:n]]  # shared by both completions
    eos = tok.eos_token_id
    assert out["prompt_ids"][0] + out["chosen_ids"][0] == joint + [eos]
    assert out["prompt_ids"][0] + out["rejected_ids"][0] == tok(prompt + other)["input_ids"] + [eos]
    # nothing lost or repeated: the sequence decodes to the texts
    assert tok.decode(out["prompt_ids"][0] + out["chosen_ids"][0], skip_special_tokens=True) == (
        tok.decode(joint, skip_special_tokens=True)
    )


def test_merged_rows_are_counted_and_logged(sp, caplog):
    rows = [
        {"prompt": "[INST] Tell me a joke. [/INST] ", "chosen": "Sure thing.", "rejected": "No."},
        {"prompt": "[INST] Tell me a joke. [/INST]", "chosen": " Sure thing.", "rejected": " No."},
    ]
    dm = PreferenceDataModule(datasets.Dataset.from_list(rows), tokenizer=sp)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert dm.stats["train"] == {
        "read": 2, "used": 2, "truncated": 0, "dropped": {}, "boundary_merged": 1,
    }  # fmt: skip
    assert "prefl data [train]: 1 of 2 rows have a token that merges across" in caplog.text
    assert "boundary_merged" not in dm.datasets["train"].column_names


def test_truncation_rules_hold_on_joint_ids(sp):
    prompt, text = HH_ROWS[1][0], HH_ROWS[1][1]
    full = sp(prompt + text)["input_ids"]
    p = len(sp(prompt)["input_ids"])
    out = tokenize_rows(sp, "sft", [{"prompt": prompt, "completion": text}], "explicit", 12, 5)
    # prompt: BOS + its last 4 ids; completion: cut from the right, no EOS
    assert out["prompt_ids"] == [[sp.bos_token_id, *full[p - 4 : p]]]
    assert out["completion_ids"] == [full[p : p + 7]] and out["truncated"] == [True]
    assert sp.eos_token_id not in out["completion_ids"][0]


def test_real_hh_rows(hh_rows):
    """Anthropic HH (harmless test split, 2,312 rows) with a SentencePiece BPE trained on 400 of
    its rows: every completion is its joint suffix, no boundary merges; a completion starts with
    a lone "▁" only where the joint text has one (a word the small vocabulary lacks, under 2%),
    where completions on their own (the old rule) all did."""
    tok = sentencepiece_bpe([r["chosen"] for r in hh_rows[:400]], vocab_size=2000)
    lone, eos = lone_metaspace_id(tok), tok.eos_token_id
    out = tokenize_rows(tok, "pairs", hh_rows, "implicit", max_length=100_000)
    kept = [i for i, r in enumerate(out["drop_reason"]) if not r]
    assert len(kept) > 2300 and sum(out["boundary_merged"]) == 0
    for key in ("chosen", "rejected"):
        full = tok([hh_rows[i][key] for i in kept])["input_ids"]
        sequences = [out["prompt_ids"][i] + out[f"{key}_ids"][i] for i in kept]
        assert sequences == [ids + [eos] for ids in full]
    starts = [out[f"{k}_ids"][i][0] for i in kept for k in ("chosen", "rejected")]
    assert starts.count(lone) < 0.02 * len(starts)
    replies = [split_implicit(hh_rows[i]["chosen"], hh_rows[i]["rejected"])[1] for i in kept]
    assert all(ids[0] == lone for ids in encode_alone(tok, replies, chat=False))
