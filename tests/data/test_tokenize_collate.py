"""Tests for prefl.data.tokenize and prefl.data.collate with exact token ids.

Ids come from the toy tokenizer: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2 (prepended to
non-chat prompts); word ids are looked up with ``convert_tokens_to_ids`` (see ``ids``).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from offline_tokenizers import tokenize_rows
from tokenizers import processors

from prefl.data.boundary import end_with_eos, strip_after_eos
from prefl.data.collate import PreferenceCollator, pad, padded_length
from prefl.data.formats import Columns, RowError
from prefl.data.tokenize import (
    DROP_REASONS,
    Limits,
    fit_completion,
    tokenize_batch,
    tokenize_row,
    truncate_prompt,
)
from prefl.data.tokenizers import build_toy_tokenizer

PAD, EOS, BOS = 0, 1, 2
P1 = "happily , the movie was"  # 5 words -> 6 prompt ids with BOS
P2 = "sadly , the film is"  # 5 words -> 6 prompt ids with BOS


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_toy_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (
        PAD,
        EOS,
        BOS,
    )
    return tokenizer


def ids(tok, text: str) -> list[int]:
    """Ids of whitespace-separated words (the toy tokenizer is word-level)."""
    out = tok.convert_tokens_to_ids(text.split())
    assert tok.unk_token_id not in out, text
    return out


def run(
    tok,
    mode: str,
    rows: list[dict],
    fmt: str = "explicit",
    max_length: int = 64,
    max_prompt_length: int | None = None,
    multiple: int | None = None,
) -> tuple[dict[str, list], dict]:
    """Tokenize ``rows`` with tokenize_batch and collate all of them into one batch."""
    out = tokenize_rows(tok, mode, rows, fmt, max_length, max_prompt_length)
    examples = [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]
    return out, PreferenceCollator(tok.pad_token_id, mode, multiple)(examples)


def rows_of(t: torch.Tensor) -> list[list[int]]:
    return t.tolist()


# --------------------------------------------------------------------------- modes


def test_sft_exact_ids_and_masks(tok):
    rows = [{"prompt": P1, "completion": "great fun"}, {"prompt": P2, "completion": "bad"}]
    out, b = run(tok, "sft", rows)
    p1, p2 = [BOS, *ids(tok, P1)], [BOS, *ids(tok, P2)]
    assert out["prompt_ids"] == [p1, p2]
    assert out["completion_ids"] == [[*ids(tok, "great fun"), EOS], [*ids(tok, "bad"), EOS]]
    assert out["truncated"] == [False, False] and out["drop_reason"] == ["", ""]
    assert set(b) == {"input_ids", "attention_mask", "loss_mask"}
    assert rows_of(b["input_ids"]) == [
        [*p1, *ids(tok, "great fun"), EOS],
        [*p2, *ids(tok, "bad"), EOS, PAD],
    ]
    assert rows_of(b["attention_mask"]) == [[1] * 9, [1] * 8 + [0]]
    # Loss on the completion tokens only, EOS included; never on prompt or padding.
    assert rows_of(b["loss_mask"]) == [[0] * 6 + [1] * 3, [0] * 6 + [1] * 2 + [0]]
    assert all(t.dtype == torch.long for t in b.values())


def test_sft_literal_ids(tok):
    # The same first row written as literal ids: happily=7 ,=28 the=55 movie=16 was=24 great=30
    # fun=34 (positions in TOY_SPECIAL_TOKENS + toy.vocabulary()).
    _, b = run(tok, "sft", [{"prompt": P1, "completion": "great fun"}])
    assert rows_of(b["input_ids"]) == [[2, 7, 28, 55, 16, 24, 30, 34, 1]]


def test_pairs_common_length_right_padding(tok):
    rows = [
        {"prompt": P1, "chosen": "great fun", "rejected": "bad"},
        {"prompt": P2, "chosen": "good moments", "rejected": "very dull and flat"},
    ]
    out, b = run(tok, "pairs", rows)
    p1, p2 = [BOS, *ids(tok, P1)], [BOS, *ids(tok, P2)]
    assert out["chosen_ids"] == [[*ids(tok, "great fun"), EOS], [*ids(tok, "good moments"), EOS]]
    assert out["rejected_ids"] == [[*ids(tok, "bad"), EOS], [*ids(tok, "very dull and flat"), EOS]]
    assert set(b) == {
        f"{n}_{k}"
        for n in ("chosen", "rejected")
        for k in ("input_ids", "attention_mask", "loss_mask")
    }
    # Longest sequence: rejected of row 2, 6 + 4 + 1 = 11 -> every tensor is (2, 11).
    assert {tuple(t.shape) for t in b.values()} == {(2, 11)}
    assert rows_of(b["chosen_input_ids"]) == [
        [*p1, *ids(tok, "great fun"), EOS, PAD, PAD],
        [*p2, *ids(tok, "good moments"), EOS, PAD, PAD],
    ]
    assert rows_of(b["rejected_input_ids"]) == [
        [*p1, *ids(tok, "bad"), EOS, PAD, PAD, PAD],
        [*p2, *ids(tok, "very dull and flat"), EOS],
    ]
    assert rows_of(b["chosen_attention_mask"]) == [[1] * 9 + [0] * 2] * 2
    assert rows_of(b["rejected_attention_mask"]) == [[1] * 8 + [0] * 3, [1] * 11]
    assert rows_of(b["chosen_loss_mask"]) == [[0] * 6 + [1] * 3 + [0] * 2] * 2
    assert rows_of(b["rejected_loss_mask"]) == [[0] * 6 + [1] * 2 + [0] * 3, [0] * 6 + [1] * 5]
    assert "margin" not in b
    # Chosen and rejected stack on the batch dimension for one forward.
    assert torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]).shape == (4, 11)


def test_prompts_left_padding_and_texts(tok):
    long_prompt = "frankly , the plot seemed quite long"  # 7 words -> 8 ids
    rows = [{"prompt": P1}, {"prompt": long_prompt}]
    out, b = run(tok, "prompts", rows)
    assert out["prompt"] == [P1, long_prompt]
    assert set(out) == {"prompt_ids", "truncated", "drop_reason", "boundary_merged", "prompt"}
    assert out["boundary_merged"] == [False, False]
    assert set(b) == {"prompt_input_ids", "prompt_attention_mask", "prompt"}
    assert rows_of(b["prompt_input_ids"]) == [
        [PAD, PAD, BOS, *ids(tok, P1)],
        [BOS, *ids(tok, long_prompt)],
    ]
    assert rows_of(b["prompt_attention_mask"]) == [[0, 0] + [1] * 6, [1] * 8]
    assert b["prompt"] == [P1, long_prompt]


def test_prompts_mode_has_no_length_drop(tok):
    # No completion -> never "prompt_too_long"; only max_prompt_length cuts prompts.
    out, b = run(tok, "prompts", [{"prompt": P1}], max_length=2)
    assert out["drop_reason"] == [""] and out["truncated"] == [False]
    out, b = run(tok, "prompts", [{"prompt": P1}], max_length=2, max_prompt_length=3)
    assert out["prompt_ids"] == [[BOS, *ids(tok, "movie was")]] and out["truncated"] == [True]


# --------------------------------------------------------------------------- EOS exactly once


def test_eos_text_in_a_plain_completion_is_text(tok):
    # "<eos>" written in a row is text, not the EOS token (issue 15, defect 3): the toy
    # tokenizer, word-level, reads it as an unknown word; prefl appends the one real EOS.
    UNK = tok.unk_token_id
    out, b = run(tok, "sft", [{"prompt": P1, "completion": "great fun <eos>"}])
    assert out["completion_ids"] == [[*ids(tok, "great fun"), UNK, EOS]]
    out, _ = run(tok, "pairs", [{"prompt": P1, "chosen": "good <eos>", "rejected": "bad"}])
    assert out["chosen_ids"] == [[*ids(tok, "good"), UNK, EOS]]
    assert out["rejected_ids"] == [[*ids(tok, "bad"), EOS]]


def test_end_with_eos_and_strip_after_eos():
    """A completion's ids end with EOS exactly once; whitespace a chat template writes after its
    final EOS is dropped, nothing else."""
    assert end_with_eos([30], EOS) == [30, EOS] and end_with_eos([30, EOS], EOS) == [30, EOS]
    assert strip_after_eos("great <eos> ", "<eos>") == "great <eos>"
    assert strip_after_eos("great <eos>\n", "<eos>") == "great <eos>"
    assert strip_after_eos("great <eos> x ", "<eos>") == "great <eos> x "
    assert strip_after_eos("great", "<eos>") == "great"


def test_chat_template_completion_ends_with_single_eos(tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": P1}],
            "chosen": [{"role": "assistant", "content": "great fun"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    ]
    out, b = run(tok, "pairs", rows, fmt="conversational")
    user, asst = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    # The template writes BOS itself: no second BOS is added.
    prompt = [BOS, user, *ids(tok, P1), EOS, asst]
    assert prompt == [2, 5, 7, 28, 55, 16, 24, 1, 6]
    assert out["prompt_ids"] == [prompt]
    assert out["chosen_ids"] == [[*ids(tok, "great fun"), EOS]]
    assert out["rejected_ids"] == [[*ids(tok, "bad"), EOS]]
    assert rows_of(b["chosen_input_ids"]) == [[*prompt, *ids(tok, "great fun"), EOS]]
    assert rows_of(b["chosen_loss_mask"]) == [[0] * 9 + [1] * 3]


def test_chat_sft_messages_column(tok):
    rows = [
        {
            "messages": [
                {"role": "user", "content": P2},
                {"role": "assistant", "content": "dull"},
            ]
        }
    ]
    out, b = run(tok, "sft", rows, fmt="conversational")
    assert out["completion_ids"] == [[*ids(tok, "dull"), EOS]]
    assert rows_of(b["input_ids"])[0][-2:] == [ids(tok, "dull")[0], EOS]
    assert rows_of(b["input_ids"])[0].count(BOS) == 1


# --------------------------------------------------------------------------- truncation


def test_prompt_cut_from_left_keeps_bos(tok):
    out, b = run(tok, "sft", [{"prompt": P1, "completion": "good"}], max_prompt_length=3)
    assert out["prompt_ids"] == [[BOS, *ids(tok, "movie was")]]
    assert out["truncated"] == [True] and out["drop_reason"] == [""]
    assert rows_of(b["input_ids"]) == [[BOS, *ids(tok, "movie was good"), EOS]]
    assert rows_of(b["loss_mask"]) == [[0, 0, 0, 1, 1]]


def test_chat_prompt_cut_keeps_bos_only_where_the_tokenizer_adds_one(tok):
    """A chat prompt cut from the left keeps a BOS that the tokenizer puts before every text (the
    toy tokenizer's post-processor); where BOS is only a token of the chat template (SmolLM2's
    ``<|im_start|>``), the cut is a plain left cut."""
    row = {
        "prompt": [{"role": "user", "content": P1}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    turn_end = [EOS, tok.convert_tokens_to_ids("<|assistant|>")]
    out, _ = run(tok, "pairs", [row], "conversational", max_prompt_length=3)
    assert out["prompt_ids"] == [[BOS, *turn_end]]
    template_bos = copy.deepcopy(tok)
    template_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B"
    )
    out, _ = run(template_bos, "pairs", [row], "conversational", max_prompt_length=3)
    assert out["prompt_ids"] == [[*ids(tok, "was"), *turn_end]]
    full, _ = run(template_bos, "pairs", [row], "conversational")
    assert full["prompt_ids"][0][0] == BOS  # the template still writes it when nothing is cut


def test_truncate_prompt_unit():
    assert truncate_prompt([2, 7, 28, 55], 4, 2) == ([2, 7, 28, 55], False)
    assert truncate_prompt([2, 7, 28, 55], None, 2) == ([2, 7, 28, 55], False)
    assert truncate_prompt([2, 7, 28, 55], 2, 2) == ([2, 55], True)
    # Limit 1 leaves no room for BOS plus a token: keep the last token.
    assert truncate_prompt([2, 7, 28, 55], 1, 2) == ([55], True)
    # No BOS at the front (or no BOS id): a plain left cut.
    assert truncate_prompt([7, 28, 55], 2, 2) == ([28, 55], True)
    assert truncate_prompt([2, 7, 28, 55], 2, None) == ([28, 55], True)


def test_completion_cut_from_right_without_eos(tok):
    # Prompt 6 ids, max_length 8 -> room for 2 completion ids; "great fun good" + EOS is 4.
    out, b = run(tok, "sft", [{"prompt": P1, "completion": "great fun good"}], max_length=8)
    assert out["completion_ids"] == [ids(tok, "great fun")]
    assert EOS not in out["completion_ids"][0]
    assert out["truncated"] == [True] and out["drop_reason"] == [""]
    assert rows_of(b["input_ids"]) == [[BOS, *ids(tok, P1), *ids(tok, "great fun")]]
    assert rows_of(b["loss_mask"]) == [[0] * 6 + [1] * 2]


def test_completion_that_just_fits_keeps_eos(tok):
    out, _ = run(tok, "sft", [{"prompt": P1, "completion": "great"}], max_length=8)
    assert out["completion_ids"] == [[*ids(tok, "great"), EOS]] and out["truncated"] == [False]


def test_fit_completion_unit():
    assert fit_completion(3, [5, 6, 1], 6) == ([5, 6, 1], False)
    assert fit_completion(3, [5, 6, 1], 5) == ([5, 6], True)
    assert fit_completion(6, [5, 6, 1], 5) == ([], True)


@pytest.mark.parametrize("mode", ["sft", "pairs"])
def test_prompt_too_long(tok, mode):
    row = {"prompt": P1, "completion": "good", "chosen": "good", "rejected": "bad"}
    # 6 prompt ids and max_length 6: no room for a completion.
    out, _ = run(tok, mode, [row], max_length=6)
    assert out["drop_reason"] == ["prompt_too_long"]
    # Cut to max_prompt_length 4, but max_length 4 still leaves no room.
    out, _ = run(tok, mode, [row], max_length=4, max_prompt_length=4)
    assert out["drop_reason"] == ["prompt_too_long"]
    # max_length 7 leaves one token: kept, truncated.
    out, _ = run(tok, mode, [row], max_length=7)
    assert out["drop_reason"] == [""] and out["truncated"] == [True]


def test_identical_and_identical_after_truncation(tok):
    rows = [
        {"prompt": P1, "chosen": "great fun good", "rejected": "great fun bad"},
        {"prompt": P1, "chosen": "great fun", "rejected": "great fun"},
        {"prompt": P1, "chosen": "great", "rejected": "bad"},
    ]
    out, _ = run(tok, "pairs", rows, max_length=8)
    assert out["drop_reason"] == ["identical_after_truncation", "identical", ""]
    assert out["chosen_ids"][0] == out["rejected_ids"][0] == ids(tok, "great fun")
    assert set(out["drop_reason"]) - {""} <= set(DROP_REASONS)


def test_tokenize_row_unit():
    limits = Limits(max_length=5, max_prompt_length=3)
    result = tokenize_row([2, 7, 28, 55, 16], [[30, 1], [40, 1]], limits, bos_id=2)
    assert result == {
        "prompt_ids": [2, 55, 16],
        "completions": [[30, 1], [40, 1]],
        "truncated": True,
        "drop_reason": "",
    }


def test_limits_validation():
    with pytest.raises(ValueError, match="max_length must be >= 2, got 1"):
        Limits(1)
    with pytest.raises(ValueError, match="max_prompt_length must be >= 1, got 0"):
        Limits(8, 0)


# --------------------------------------------------------------------------- padding, margin


def test_padded_length():
    assert padded_length([3, 9, 5], None) == 9
    assert padded_length([3, 9, 5], 8) == 16
    assert padded_length([3, 8, 5], 8) == 8
    assert padded_length([9], 3) == 9
    assert padded_length([1], 64) == 64


def test_pad_left_and_right():
    assert rows_of(pad([[1, 2], [3]], 0, 3)) == [[1, 2, 0], [3, 0, 0]]
    assert rows_of(pad([[1, 2], [3]], 0, 3, left=True)) == [[0, 1, 2], [0, 0, 3]]
    assert rows_of(pad([[], [3]], 9, 2)) == [[9, 9], [3, 9]]


def test_pad_to_multiple_of_sft(tok):
    rows = [{"prompt": P1, "completion": "great fun"}, {"prompt": P2, "completion": "bad"}]
    _, b = run(tok, "sft", rows, multiple=8)  # longest 9 -> 16
    assert b["input_ids"].shape == (2, 16)
    assert rows_of(b["input_ids"])[0][9:] == [PAD] * 7
    assert rows_of(b["attention_mask"]) == [[1] * 9 + [0] * 7, [1] * 8 + [0] * 8]
    assert rows_of(b["loss_mask"])[0] == [0] * 6 + [1] * 3 + [0] * 7
    _, b = run(tok, "sft", rows, multiple=3)  # 9 is already a multiple of 3
    assert b["input_ids"].shape == (2, 9)
    _, b = run(tok, "sft", rows, multiple=9)
    assert b["input_ids"].shape == (2, 9)


def test_pad_to_multiple_of_pairs_and_prompts(tok):
    rows = [
        {"prompt": P1, "chosen": "great fun", "rejected": "bad"},
        {"prompt": P2, "chosen": "good moments", "rejected": "very dull and flat"},
    ]
    _, b = run(tok, "pairs", rows, multiple=4)  # 11 -> 12, one length for both sides
    assert {tuple(t.shape) for t in b.values()} == {(2, 12)}
    _, b = run(tok, "prompts", [{"prompt": P1}], multiple=4)  # 6 -> 8, padded on the left
    assert rows_of(b["prompt_input_ids"]) == [[PAD, PAD, BOS, *ids(tok, P1)]]
    assert rows_of(b["prompt_attention_mask"]) == [[0, 0, 1, 1, 1, 1, 1, 1]]


def test_batch_of_one(tok):
    _, b = run(
        tok, "pairs", [{"prompt": P1, "chosen": "great fun", "rejected": "bad", "margin": 2}]
    )
    assert {k: tuple(v.shape) for k, v in b.items()} == {
        **{f"chosen_{k}": (1, 9) for k in ("input_ids", "attention_mask", "loss_mask")},
        **{f"rejected_{k}": (1, 9) for k in ("input_ids", "attention_mask", "loss_mask")},
        "margin": (1,),
    }
    assert rows_of(b["rejected_input_ids"]) == [[BOS, *ids(tok, P1), *ids(tok, "bad"), EOS, PAD]]
    _, b = run(tok, "sft", [{"prompt": P1, "completion": "good"}])
    assert b["input_ids"].shape == (1, 8) and int(b["attention_mask"].sum()) == 8


def test_margin_passes_through_as_float(tok):
    rows = [
        {"prompt": P1, "chosen": "great", "rejected": "bad", "margin": 1.5},
        {"prompt": P2, "chosen": "good", "rejected": "dull", "margin": 2},
    ]
    out, b = run(tok, "pairs", rows)
    assert out["margin"] == [1.5, 2.0]
    assert b["margin"].dtype == torch.float32
    assert b["margin"].tolist() == [1.5, 2.0]


@pytest.mark.parametrize("bad", ["high", None, True, [1.0], float("nan"), float("inf")])
def test_non_numeric_margin_is_row_error(tok, bad):
    rows = [
        {"prompt": P1, "chosen": "great", "rejected": "bad", "margin": 1.0},
        {"prompt": P2, "chosen": "good", "rejected": "dull", "margin": bad},
    ]
    where = re.escape("split 'train', row 1, column 'margin': expected a finite number")
    with pytest.raises(RowError, match=where):
        run(tok, "pairs", rows)


def test_row_error_from_tokenize_batch_names_row_index(tok):
    batch = {"prompt": [P1, P2], "chosen": ["good", ""], "rejected": ["bad", "dull"]}
    with pytest.raises(RowError, match=re.escape("split 'validation', row 11, column 'chosen'")):
        tokenize_batch(
            batch,
            [10, 11],
            split="validation",
            mode="pairs",
            row_format="explicit",
            columns=Columns(),
            tokenizer=tok,
            limits=Limits(64),
            use_margin=False,
        )


def test_collator_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'dpo'"):
        PreferenceCollator(0, "dpo")


def test_blank_implicit_reply_is_dropped_as_empty_completion(tok):
    """An implicit pair whose chosen reply is only whitespace (4 real Anthropic HH rows) is
    dropped and counted, not an error; the other row is kept."""
    rows = [
        {"chosen": "happily , the movie was  ", "rejected": "happily , the movie was dull"},
        {"chosen": "happily , the movie was good", "rejected": "happily , the movie was dull"},
    ]
    for mode in ("pairs", "sft"):
        out, _ = run(tok, mode, rows, fmt="implicit")
        assert out["drop_reason"] == ["empty_completion", ""]
