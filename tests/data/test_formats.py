"""Tests for prefl.data.formats: row texts per format and mode, row errors (split, row index and
column named), format detection and required columns (implicit-prompt splitting is in
test_split_implicit.py).

The toy tokenizer's chat template writes ``<bos>`` once, then ``<|role|> content <eos> `` per turn,
then ``<|assistant|> `` as the generation prompt; the expected strings below follow from it.
"""

from __future__ import annotations

import re

import pytest

from prefl.data.formats import (
    Columns,
    RowError,
    RowTexts,
    detect_format,
    extract_texts,
    required_columns,
)

H, A = "\n\nHuman:", "\n\nAssistant:"
WHERE = ("train", 3)
COLS = Columns()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def where_pattern(column: str, split: str = "train", index: int = 3) -> str:
    return re.escape(f"split {split!r}, row {index}, column {column!r}: ") + ".*"


# --------------------------------------------------------------------------- extract_texts

EXPLICIT = {"prompt": "happily , the movie was", "chosen": "great fun", "rejected": "bad"}
HH_PROMPT = f"{H} What should I watch tonight?{A}"
IMPLICIT = {"chosen": HH_PROMPT + " A comedy.", "rejected": HH_PROMPT + " Nothing."}
TOY_PROMPT_TEXT = "<bos><|user|> happily , the movie was <eos> <|assistant|> "


def test_extract_explicit_each_mode(tok):
    assert extract_texts(EXPLICIT, "pairs", "explicit", COLS, tok, WHERE) == RowTexts(
        "happily , the movie was", "great fun", "bad", chat=False
    )
    # SFT falls back to chosen when there is no completion column.
    assert extract_texts(EXPLICIT, "sft", "explicit", COLS, tok, WHERE) == RowTexts(
        "happily , the movie was", "great fun"
    )
    sft_row = {"prompt": "sadly , the film is", "completion": "dull and flat"}
    assert extract_texts(sft_row, "sft", "explicit", COLS, tok, WHERE) == RowTexts(
        "sadly , the film is", "dull and flat"
    )
    assert extract_texts(
        {"prompt": "overall , the cast was"}, "prompts", "explicit", COLS, tok, WHERE
    ) == (RowTexts("overall , the cast was"))


def test_extract_explicit_remapped_columns(tok):
    cols = Columns(prompt="question", chosen="good", rejected="bad")
    row = {"question": "q ?", "good": "yes", "bad": "no"}
    assert extract_texts(row, "pairs", "explicit", cols, tok, WHERE) == RowTexts("q ?", "yes", "no")


def test_extract_implicit_each_mode(tok):
    pairs = extract_texts(IMPLICIT, "pairs", "implicit", COLS, tok, WHERE)
    assert pairs == RowTexts(HH_PROMPT, " A comedy.", " Nothing.", chat=False)
    sft = extract_texts(IMPLICIT, "sft", "implicit", COLS, tok, WHERE)
    assert (sft.prompt, sft.chosen, sft.chat) == (HH_PROMPT, " A comedy.", False)
    prompts = extract_texts(IMPLICIT, "prompts", "implicit", COLS, tok, WHERE)
    assert prompts.prompt == HH_PROMPT


def test_extract_conversational_prompt_and_reply_lists(tok):
    row = {
        "prompt": [user("happily , the movie was")],
        "chosen": [assistant("great fun")],
        "rejected": [assistant("bad")],
    }
    assert extract_texts(row, "pairs", "conversational", COLS, tok, WHERE) == RowTexts(
        TOY_PROMPT_TEXT, "great fun <eos> ", "bad <eos> ", chat=True
    )
    sft = extract_texts(row, "sft", "conversational", COLS, tok, WHERE)
    assert (sft.prompt, sft.chosen, sft.rejected, sft.chat) == (
        TOY_PROMPT_TEXT,
        "great fun <eos> ",
        None,
        True,
    )
    assert extract_texts(row, "prompts", "conversational", COLS, tok, WHERE) == RowTexts(
        TOY_PROMPT_TEXT, chat=True
    )
    sft_row = {"prompt": [user("happily , the movie was")], "completion": [assistant("good")]}
    assert extract_texts(sft_row, "sft", "conversational", COLS, tok, WHERE) == RowTexts(
        TOY_PROMPT_TEXT, "good <eos> ", chat=True
    )


def test_extract_conversational_full_conversations(tok):
    shared = [
        {"role": "system", "content": "be kind"},
        user("sadly , the film"),
        assistant("was"),
        user("then ?"),
    ]
    row = {"chosen": [*shared, assistant("good moments")], "rejected": [*shared, assistant("dull")]}
    prompt = (
        "<bos><|system|> be kind <eos> <|user|> sadly , the film <eos> "
        "<|assistant|> was <eos> <|user|> then ? <eos> <|assistant|> "
    )
    assert extract_texts(row, "pairs", "conversational", COLS, tok, WHERE) == RowTexts(
        prompt, "good moments <eos> ", "dull <eos> ", chat=True
    )
    sft = extract_texts(row, "sft", "conversational", COLS, tok, WHERE)
    assert (sft.prompt, sft.chosen) == (prompt, "good moments <eos> ")
    assert extract_texts(row, "prompts", "conversational", COLS, tok, WHERE) == RowTexts(
        prompt, chat=True
    )


def test_extract_conversational_messages_column(tok):
    row = {"messages": [user("happily , the movie was"), assistant("great fun")]}
    assert extract_texts(row, "sft", "conversational", COLS, tok, WHERE) == RowTexts(
        TOY_PROMPT_TEXT, "great fun <eos> ", chat=True
    )
    assert extract_texts(row, "prompts", "conversational", COLS, tok, WHERE) == RowTexts(
        TOY_PROMPT_TEXT, chat=True
    )


# --------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("row", "column", "problem"),
    [
        ({**EXPLICIT, "prompt": None}, "prompt", "expected a non-empty string, got None"),
        ({"prompt": "p", "chosen": "c"}, "rejected", "expected a non-empty string, got None"),
        ({**EXPLICIT, "chosen": 5}, "chosen", "expected a non-empty string, got int"),
        ({**EXPLICIT, "rejected": ["bad"]}, "rejected", "expected a non-empty string, got list"),
        ({**EXPLICIT, "chosen": ""}, "chosen", "expected a non-empty string, got an empty one"),
        ({**EXPLICIT, "prompt": " \n "}, "prompt", "expected a non-empty string, got an empty one"),
    ],
)
def test_explicit_bad_fields(tok, row, column, problem):
    with pytest.raises(RowError, match=where_pattern(column) + re.escape(problem)) as info:
        extract_texts(row, "pairs", "explicit", COLS, tok, WHERE)
    assert (info.value.split, info.value.index, info.value.column) == ("train", 3, column)


def test_bad_field_in_sft_and_prompts_modes(tok):
    with pytest.raises(RowError, match=where_pattern("completion", "validation", 7) + "got float"):
        extract_texts(
            {"prompt": "p", "completion": 1.5}, "sft", "explicit", COLS, tok, ("validation", 7)
        )
    with pytest.raises(RowError, match=where_pattern("prompt", "test", 0) + "got None"):
        extract_texts({"prompt": None}, "prompts", "explicit", COLS, tok, ("test", 0))


def test_implicit_bad_rows(tok):
    with pytest.raises(RowError, match=where_pattern("chosen") + "share no prompt"):
        extract_texts(
            {"chosen": "abc def", "rejected": "xyz"}, "pairs", "implicit", COLS, tok, WHERE
        )
    with pytest.raises(RowError, match=where_pattern("rejected") + "got None"):
        extract_texts(
            {"chosen": "abc def", "rejected": None}, "pairs", "implicit", COLS, tok, WHERE
        )
    with pytest.raises(RowError, match=where_pattern("rejected") + "need a rejected text"):
        extract_texts({"chosen": "abc def"}, "sft", "implicit", COLS, tok, WHERE)


@pytest.mark.parametrize(
    ("row", "column", "problem"),
    [
        (
            {
                "chosen": [user("hi"), {"role": "bot", "content": "x"}],
                "rejected": [user("hi"), assistant("y")],
            },
            "chosen",
            "message 1 has unknown role 'bot'",
        ),
        (
            {
                "chosen": [user("hi"), assistant("x")],
                "rejected": [user("hi"), assistant("y"), user("z")],
            },
            "rejected",
            "the conversation does not end with an assistant turn",
        ),
        (
            {"prompt": [user("hi")], "chosen": [user("x")], "rejected": [assistant("y")]},
            "chosen",
            "the conversation does not end with an assistant turn",
        ),
        (
            {"chosen": [user("hi"), assistant("x")], "rejected": [user("hello"), assistant("y")]},
            "rejected",
            "the conversations differ before their last turn",
        ),
        (
            {"chosen": [assistant("x")], "rejected": [assistant("y")]},
            "chosen",
            "no prompt: the conversation has a single turn",
        ),
        (
            {"chosen": [user("hi"), assistant(" ")], "rejected": [user("hi"), assistant("y")]},
            "chosen",
            "the last assistant turn is empty",
        ),
        (
            {"chosen": [], "rejected": [user("hi"), assistant("y")]},
            "chosen",
            "expected a non-empty list",
        ),
        (
            {"chosen": [user("hi"), "x"], "rejected": [user("hi"), assistant("y")]},
            "chosen",
            "message 1 is not a {role, content} mapping",
        ),
        (
            {
                "chosen": [user("hi"), assistant("x")],
                "rejected": [user("hi"), {"role": "assistant", "content": 3}],
            },
            "rejected",
            "message 1 content is not a string",
        ),
    ],
)
def test_conversational_bad_rows(tok, row, column, problem):
    with pytest.raises(RowError, match=where_pattern(column) + re.escape(problem)):
        extract_texts(row, "pairs", "conversational", COLS, tok, WHERE)


def test_conversational_prompt_without_assistant_end_is_fine_for_prompts(tok):
    # A prompt list may end with a user turn; only completions must be assistant turns.
    row = {"prompt": [user("happily , the movie was")]}
    assert (
        extract_texts(row, "prompts", "conversational", COLS, tok, WHERE).prompt == TOY_PROMPT_TEXT
    )


# --------------------------------------------------------------------------- detect_format


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "explicit"),
        ({"prompt": "p", "completion": "c"}, "explicit"),
        ({"prompt": "p"}, "explicit"),
        ({"chosen": "c", "rejected": "r"}, "implicit"),
        ({"chosen": "c", "rejected": "r", "margin": 1.0}, "implicit"),
        ({"messages": [user("a"), assistant("b")]}, "conversational"),
        (
            {"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
            "conversational",
        ),
        (
            {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]},
            "conversational",
        ),
        ({"prompt": [user("a")], "completion": [assistant("b")]}, "conversational"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row, COLS) == expected


def test_detect_format_remapped_columns():
    cols = Columns(prompt="question", chosen="good", rejected="bad")
    assert detect_format({"question": "q", "good": "g", "bad": "b"}, cols) == "explicit"
    assert detect_format({"good": "g", "bad": "b"}, cols) == "implicit"
    assert detect_format({"good": [user("q"), assistant("g")], "bad": []}, cols) == "conversational"


@pytest.mark.parametrize("row", [{"text": "x", "label": 1}, {"chosen": "only chosen"}, {}])
def test_detect_format_error_lists_found_columns(row):
    with pytest.raises(ValueError, match="cannot detect the row format") as info:
        detect_format(row, COLS)
    assert f"found {sorted(row)}" in str(info.value)
    assert "'prompt'" in str(info.value) and "'chosen'/'rejected'" in str(info.value)


# --------------------------------------------------------------------------- required_columns


@pytest.mark.parametrize(
    ("mode", "fmt", "names", "expected"),
    [
        ("pairs", "explicit", ["prompt", "chosen", "rejected"], ["prompt", "chosen", "rejected"]),
        ("pairs", "implicit", ["chosen", "rejected"], ["chosen", "rejected"]),
        ("pairs", "conversational", ["chosen", "rejected"], ["chosen", "rejected"]),
        (
            "pairs",
            "conversational",
            ["prompt", "chosen", "rejected"],
            ["prompt", "chosen", "rejected"],
        ),
        ("sft", "explicit", ["prompt", "completion"], ["prompt", "completion"]),
        ("sft", "explicit", ["prompt", "chosen", "rejected"], ["prompt", "chosen"]),
        ("sft", "implicit", ["chosen", "rejected"], ["chosen", "rejected"]),
        ("sft", "conversational", ["messages"], ["messages"]),
        ("prompts", "explicit", ["prompt", "chosen"], ["prompt"]),
        ("prompts", "conversational", ["messages"], ["messages"]),
        ("prompts", "conversational", ["chosen", "rejected"], ["chosen"]),
    ],
)
def test_required_columns(mode, fmt, names, expected):
    assert required_columns(mode, fmt, COLS, names) == expected
