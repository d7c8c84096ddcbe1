"""Anthropic HH transcripts read as chat messages (``row_format="hh_chat"``, prefl.data.hh):
the parse rules on hand-written transcripts, every failure reason, the data-module option
(drops counted, error_on_drop, the three modes, two chat templates) and the real HH rows."""

from __future__ import annotations

import json
import pickle
import re

import pytest
from offline_tokenizers import byte_level_bpe

from prefl.data import PreferenceDataModule, RowError, build_toy_tokenizer
from prefl.data import accounting as accounting_module
from prefl.data.hh import (
    PARSE_REASONS,
    HHParseError,
    parse_hh_pair,
    parse_hh_transcript,
    render_hh,
)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def hh(*turns):
    """A transcript from alternating turns, user first, written as HH writes them."""
    names = ["Human", "Assistant"]
    return "".join(f"\n\n{names[i % 2]}: {t}" for i, t in enumerate(turns))


# --- parsing ---------------------------------------------------------------------------------


def test_single_turn():
    assert parse_hh_transcript("\n\nHuman: Hi there\n\nAssistant: Hello!") == [
        user("Hi there"),
        bot("Hello!"),
    ]


def test_multi_turn_pair():
    chosen = hh("Can you help?", "Sure.", "Bake bread.", "Mix flour and water.")
    rejected = hh("Can you help?", "Sure.", "Bake bread.", "No.")
    assert parse_hh_pair(chosen, rejected) == {
        "prompt": [user("Can you help?"), bot("Sure."), user("Bake bread.")],
        "chosen": [bot("Mix flour and water.")],
        "rejected": [bot("No.")],
    }


def test_quirks_of_real_rows():
    text = (
        "Human:  what is a pen?  \n\nAssistant:   Human: a pen is a tool.\n\n1. Write.\n"
        "Assistant: ok\n\n\n\nHuman: thanks \n\nAssistant: You're welcome.  \n"
    )
    # no leading blank line needed; whitespace around each turn stripped, inner text kept as is:
    # a "Human:" / "Assistant:" not after a blank line is text, and so is "\n\n1."
    assert parse_hh_transcript(text) == [
        user("what is a pen?"),
        bot("Human: a pen is a tool.\n\n1. Write.\nAssistant: ok"),
        user("thanks"),
        bot("You're welcome."),
    ]


def test_pair_prompts_compared_after_stripping():
    chosen = "\n\nHuman: hi  \n\nAssistant: a"
    assert parse_hh_pair(chosen, "\n\nHuman: hi\n\nAssistant: b")["prompt"] == [user("hi")]


BAD_TRANSCRIPTS = [
    ("Hello\n\nHuman: hi\n\nAssistant: a", "no_human_start",
     "it does not start with a \"\\n\\nHuman:\" turn (starts with 'Hello\\n\\nHuman: hi\\n\\nAs')"),
    ("\n\nAssistant: hi", "no_human_start",
     "it does not start with a \"\\n\\nHuman:\" turn (starts with 'Assistant: hi')"),
    ("", "no_human_start", "it does not start with a \"\\n\\nHuman:\" turn (starts with '')"),
    (hh("hi", "a") + "\n\nAssistant: b", "not_alternating",
     "turns 1 and 2 are both assistant turns"),
    ("\n\nHuman: hi\n\nHuman: there\n\nAssistant: a", "not_alternating",
     "turns 0 and 1 are both user turns"),
    (hh("hi", "a", "more?"), "no_final_assistant", "the last turn is a human turn, not a reply"),
    (hh("hi"), "no_final_assistant", "the last turn is a human turn, not a reply"),
    (hh("hi", "  ", "more?", "a"), "empty_turn", "turn 1 (assistant) is empty"),
    (hh(" ", "a"), "empty_turn", "turn 0 (user) is empty"),
    (hh("hi", " "), "empty_reply", "the final assistant reply is empty"),
    ("\n\nHuman: hi\n\nAssistant:", "empty_reply", "the final assistant reply is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "reason", "detail"), BAD_TRANSCRIPTS)
def test_transcripts_that_do_not_parse(text, reason, detail):
    with pytest.raises(HHParseError) as info:
        parse_hh_transcript(text)
    err = info.value
    assert (err.reason, err.detail, err.column) == (reason, detail, None)
    assert str(err) == f"transcript does not parse ({reason}): {detail}"
    assert isinstance(err, ValueError) and reason in PARSE_REASONS
    # and in a pair, on either side, the error names the side
    good = hh("hi", "ok")
    for column, pair in (("chosen", (text, good)), ("rejected", (good, text))):
        with pytest.raises(HHParseError, match=re.escape(f"{column} transcript does not parse")):
            parse_hh_pair(*pair)


@pytest.mark.parametrize(
    ("chosen", "rejected", "detail"),
    [
        (hh("hi", "a"), hh("hello", "b"), "from turn 0 on (1 and 1 turns before it)"),
        (hh("hi", "a"), hh("hi", "x", "more", "b"), "from turn 1 on (1 and 3 turns before it)"),
        (hh("hi", "a", "more", "c"), hh("hi", "ok", "more", "b"), "from turn 1 on (3 and 3 turns "
         "before it)"),
    ],
)  # fmt: skip
def test_pair_with_different_prompts(chosen, rejected, detail):
    with pytest.raises(HHParseError) as info:
        parse_hh_pair(chosen, rejected)
    err = info.value
    assert (err.reason, err.column) == ("prompts_differ", "rejected")
    assert str(err) == (
        "rejected transcript does not parse (prompts_differ): chosen and rejected differ "
        f"before their final reply, {detail}"
    )


def test_error_pickles_for_worker_processes():
    err = HHParseError("empty_reply", "the final assistant reply is empty", "chosen")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.reason, back.column) == (str(err), "empty_reply", "chosen")


def test_render_is_the_inverse():
    text = hh("Can you help?", "Sure.", "Bake bread.", "Mix flour.\n\n1. Knead.")
    assert render_hh(parse_hh_transcript(text)) == text
    assert render_hh(parse_hh_transcript("Human:  hi \n\nAssistant: a ")) == hh("hi", "a")


# --- the data module option ------------------------------------------------------------------

GOOD = [
    {"chosen": hh("the movie was", "great ."), "rejected": hh("the movie was", "bad .")},
    {
        "chosen": hh("the plot", "was fun", "and the cast", "very good ."),
        "rejected": hh("the plot", "was fun", "and the cast", "awful ."),
    },
    {"chosen": hh("the film", "was moving ."), "rejected": hh("the film", "was dull .")},
]
BAD = [
    # row 3: chosen not alternating (a second assistant turn in the history)
    {
        "chosen": "\n\nHuman: the film\n\nAssistant: was\n\nAssistant: good .\n\nHuman: and"
        "\n\nAssistant: fun .",
        "rejected": hh("the film", "was bad ."),
    },
    # row 4: chosen reply empty (as in 4 real rows)
    {"chosen": hh("the acting", " "), "rejected": hh("the acting", "was weak .")},
    # row 5: prompts differ (the rejected transcript is fine on its own)
    {"chosen": hh("the ending", "was fresh ."), "rejected": hh("the script", "was bland .")},
]
IDENTICAL = [{"chosen": hh("the cast", "was good ."), "rejected": hh("the cast", "was good . ")}]


def write_rows(tmp_path, rows):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def info_lines(monkeypatch):
    lines = []
    monkeypatch.setattr(accounting_module, "rank_zero_info", lines.append)
    return lines


def make_dm(tmp_path, rows, tokenizer=None, **kwargs):
    kwargs.setdefault("mode", "pairs")
    return PreferenceDataModule(
        write_rows(tmp_path, rows),
        tokenizer=tokenizer or build_toy_tokenizer(),
        row_format="hh_chat",
        cache_dir=str(tmp_path / "cache"),
        **kwargs,
    )


def test_pairs_drop_and_count_unparsed_rows(tmp_path, info_lines):
    tok = build_toy_tokenizer()
    dm = make_dm(tmp_path, GOOD + BAD + IDENTICAL, tok, batch_size=8)
    dm.setup("fit")
    assert dm.stats["train"] == {
        "read": 7,
        "used": 3,
        "truncated": 0,
        "dropped": {"identical": 1, "unparsed_transcript": 3},
        "unparsed": {"empty_reply": 1, "not_alternating": 1, "prompts_differ": 1},
    }
    assert info_lines == [
        "prefl data [train]: read 7, used 3, truncated 0, dropped 4 (identical=1, "
        "unparsed_transcript=3 [empty_reply=1, not_alternating=1, prompts_differ=1])"
    ]
    ds = dm.datasets["train"]
    tokens = [tok.convert_ids_to_tokens(ids) for ids in ds["prompt_ids"]]
    assert tokens[0] == ["<bos>", "<|user|>", "the", "movie", "was", "<eos>", "<|assistant|>"]
    assert tokens[1] == [
        "<bos>", "<|user|>", "the", "plot", "<eos>", "<|assistant|>", "was", "fun", "<eos>",
        "<|user|>", "and", "the", "cast", "<eos>", "<|assistant|>",
    ]  # fmt: skip
    assert tok.convert_ids_to_tokens(ds["chosen_ids"][1]) == ["very", "good", ".", "<eos>"]
    assert tok.convert_ids_to_tokens(ds["rejected_ids"][1]) == ["awful", ".", "<eos>"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_input_ids"].shape[0] == 3


def test_error_on_drop_names_row_and_column(tmp_path):
    rows = [{"good": r["chosen"], "bad": r["rejected"]} for r in GOOD + BAD]
    dm = make_dm(tmp_path, rows, chosen_column="good", rejected_column="bad", error_on_drop=True)
    with pytest.raises(RowError) as info:
        dm.setup("fit")
    assert str(info.value) == (
        "split 'train', row 3, column 'good': HH chosen transcript does not parse "
        "(not_alternating): turns 1 and 2 are both assistant turns (error_on_drop=True)"
    )
    dm = make_dm(tmp_path, GOOD + BAD[2:], error_on_drop=True)
    with pytest.raises(RowError, match=r"row 3, column 'rejected': HH rejected .*prompts_differ"):
        dm.setup("fit")


def test_error_names_the_source_row_after_a_shuffle(tmp_path):
    dm = make_dm(tmp_path, GOOD * 3 + BAD[:1], subset=1.0, error_on_drop=True)
    with pytest.raises(RowError, match=r"split 'train', row 9, column 'chosen'"):
        dm.setup("fit")


def test_malformed_fields_are_errors_not_drops(tmp_path):
    dm = make_dm(tmp_path, [*GOOD, {"chosen": None, "rejected": hh("a", "b")}])
    with pytest.raises(RowError, match=r"row 3, column 'chosen': expected a non-empty string"):
        dm.setup("fit")


def test_sft_reads_the_chosen_transcript_alone(tmp_path, info_lines):
    tok = build_toy_tokenizer()
    dm = make_dm(tmp_path, GOOD + BAD, tok, mode="sft")
    dm.setup("fit")
    # the prompts_differ row is a good SFT row: its chosen transcript parses
    assert dm.stats["train"]["dropped"] == {"unparsed_transcript": 2}
    assert dm.stats["train"]["unparsed"] == {"empty_reply": 1, "not_alternating": 1}
    ds = dm.datasets["train"]
    assert len(ds) == 4
    assert tok.convert_ids_to_tokens(ds["completion_ids"][3]) == ["was", "fresh", ".", "<eos>"]
    assert tok.convert_ids_to_tokens(ds["prompt_ids"][3])[-1] == "<|assistant|>"


def test_prompts_end_with_the_generation_prompt(tmp_path):
    tok = build_toy_tokenizer()
    dm = make_dm(tmp_path, GOOD + BAD, tok, mode="prompts")
    dm.setup("fit")
    assert dm.stats["train"]["used"] == 4
    first = parse_hh_pair(GOOD[1]["chosen"], GOOD[1]["rejected"])["prompt"]
    expected = tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert dm.datasets["train"][1]["prompt"] == expected
    assert expected.endswith("<|assistant|> ")


def test_chatml_rendering(tmp_path):
    tok = byte_level_bpe()
    rows = [{**GOOD[1], "margin": 1.0}, {**GOOD[2], "margin": 2.5}]
    dm = make_dm(tmp_path, rows, tok)
    dm.setup("fit")
    ds = dm.datasets["train"]
    assert ds["margin"] == [1.0, 2.5]  # the margin column passes through
    prompt = tok.decode(ds["prompt_ids"][0])
    assert prompt == (
        "<|im_start|>user\nthe plot<|im_end|>\n<|im_start|>assistant\nwas fun<|im_end|>\n"
        "<|im_start|>user\nand the cast<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(ds["chosen_ids"][0]) == "very good .<|im_end|>"
    assert ds["chosen_ids"][0][-1] == tok.eos_token_id
    assert tok.decode(ds["rejected_ids"][0]) == "awful .<|im_end|>"


def test_a_split_where_nothing_parses(tmp_path, info_lines):
    dm = make_dm(tmp_path, BAD[:2])
    with pytest.raises(ValueError, match=r"split 'train' is empty after filtering"):
        dm.setup("fit")
    assert dm.stats["train"]["read"] == 2 and dm.stats["train"]["used"] == 0


# --- the real HH rows ------------------------------------------------------------------------


def normalised(text):
    """``text`` with the whitespace around each turn's content as :func:`render_hh` writes it
    (one space after each marker, none at the end): the documented normalisation."""
    return re.sub(r"\s*(\n\n(?:Human|Assistant):)\s*", r"\1 ", text).rstrip()


def test_real_rows_parse_and_round_trip(hh_rows):
    failures = {}
    for i, row in enumerate(hh_rows):
        try:
            parsed = parse_hh_pair(row["chosen"], row["rejected"])
        except HHParseError as err:
            failures[i] = (err.reason, err.column)
            continue
        for side in ("chosen", "rejected"):
            text = render_hh(parsed["prompt"] + parsed[side])
            assert text == normalised(row[side]), (i, side)
    # Measured: 2,299 of the 2,312 rows parse (99.4%). The bound leaves room for a few rows
    # (a variant of the file, a looser rule changed) but fails if a rule starts dropping dozens.
    assert (len(hh_rows) - len(failures)) / len(hh_rows) >= 0.99
    # Facts of this file: 4 blank chosen replies (as test_datamodule sees); 9 transcripts with
    # two assistant turns in a row, 5 of them in the shared history (reported on chosen) and 4
    # in a final reply that holds a "\n\nAssistant:" (3 chosen, 1 rejected).
    reasons = sorted(failures.values())
    assert reasons.count(("empty_reply", "chosen")) == 4
    assert reasons.count(("not_alternating", "chosen")) == 8
    assert reasons.count(("not_alternating", "rejected")) == 1
    assert len(failures) == 13


def test_real_rows_through_the_data_module(tmp_path, hh_path, hh_rows, info_lines):
    tok = byte_level_bpe([r["chosen"] for r in hh_rows[:300]], vocab_size=1000)
    dm = PreferenceDataModule(
        str(hh_path),
        tokenizer=tok,
        row_format="hh_chat",
        max_length=100_000,
        max_prompt_length=None,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    s = dm.stats["train"]
    assert (s["read"], s["used"], s["truncated"]) == (2312, 2299, 0)
    assert s["dropped"] == {"unparsed_transcript": 13}
    assert s["unparsed"] == {"empty_reply": 4, "not_alternating": 9}
    ds = dm.datasets["train"]
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for i in (0, len(ds) - 1):
        assert ds[i]["prompt_ids"][-len(header) :] == header
        assert ds[i]["chosen_ids"][-1] == ds[i]["rejected_ids"][-1] == tok.eos_token_id
