"""prefl.data.packing and the packed collator: exact layouts, by hand.

Ids are arbitrary small integers (PAD 0); a pair's prompt is ``[2, 7, 8]``, chosen ``[30, 1]``
and rejected ``[40, 41, 1]`` unless said otherwise.
"""

from __future__ import annotations

import pytest
import torch

from prefl.data.collate import PreferenceCollator
from prefl.data.packing import first_fit, shared_unit

PAIR = {"prompt_ids": [2, 7, 8], "chosen_ids": [30, 1], "rejected_ids": [40, 41, 1]}
OTHER = {"prompt_ids": [2, 9], "chosen_ids": [50, 1], "rejected_ids": [60, 1]}


def as_lists(batch: dict) -> dict:
    return {k: v.tolist() for k, v in batch.items()}


def test_a_shared_pair_continues_the_prompt_twice():
    unit = shared_unit(PAIR["prompt_ids"], PAIR["chosen_ids"], PAIR["rejected_ids"], (0, 1))
    assert unit.tokens == [2, 7, 8, 30, 1, 40, 41, 1]
    assert unit.positions == [0, 1, 2, 3, 4, 3, 4, 5]  # rejected continues from the prompt
    assert unit.branch == [0, 0, 0, 1, 1, 2, 2, 2]
    # (predicting offset, token, sequence): both first tokens are predicted at the prompt's end
    assert unit.targets == [(2, 30, 0), (3, 1, 0), (2, 40, 1), (5, 41, 1), (6, 1, 1)]
    assert unit.lasts == [(0, 4), (1, 7)]


def test_shared_pairs_one_per_row():
    batch = as_lists(PreferenceCollator(0, "pairs", share_prompt=True)([PAIR, OTHER]))
    assert batch["packed_input_ids"] == [[2, 7, 8, 30, 1, 40, 41, 1], [2, 9, 50, 1, 60, 1, 0, 0]]
    assert batch["packed_position_ids"] == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 2, 3, 0, 1]]
    assert batch["packed_segment"] == [[0] * 8, [0] * 6 + [1, 1]]  # padding: its own segment
    assert batch["packed_branch"] == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 2, 2, 0, 0]]
    # sequences: chosen 0, 1 then rejected 2, 3; flat index = row * 8 + offset
    assert batch["target_index"] == [2, 3, 2, 5, 6, 9, 10, 9, 12]
    assert batch["target_ids"] == [30, 1, 40, 41, 1, 50, 1, 60, 1]
    assert batch["target_sequence"] == [0, 0, 2, 2, 2, 1, 1, 3, 3]
    assert batch["last_index"] == [4, 11, 7, 13]
    assert batch["pair_sequences"] == [[0, 2], [1, 3]]


def test_packed_pairs_fill_rows_longest_first():
    """Four sequences of 5, 6, 4 and 4 tokens into rows of 10: the 6 and a 4, then the 5 and
    the other 4 (first fit, longest first, ties by sequence number)."""
    collate = PreferenceCollator(0, "pairs", packing=True, row_length=10)
    batch = as_lists(collate([PAIR, OTHER]))
    assert first_fit([5, 4, 6, 4], 10) == [[2, 1], [0, 3]]
    assert batch["packed_input_ids"] == [
        [2, 7, 8, 40, 41, 1, 2, 9, 50, 1],
        [2, 7, 8, 30, 1, 2, 9, 60, 1, 0],
    ]
    assert batch["packed_position_ids"] == [
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 0],
    ]
    assert batch["packed_segment"] == [[0] * 6 + [1] * 4, [0] * 5 + [1] * 4 + [2]]
    assert batch["packed_branch"] == [
        [0, 0, 0, 1, 1, 1, 0, 0, 1, 1],
        [0, 0, 0, 1, 1, 0, 0, 1, 1, 0],
    ]
    assert batch["target_sequence"] == [2, 2, 2, 1, 1, 0, 0, 3, 3]
    assert batch["target_index"] == [2, 3, 4, 7, 8, 12, 13, 16, 17]
    assert batch["last_index"] == [14, 9, 5, 18]


def test_sft_packing_and_a_unit_longer_than_a_row():
    rows = [
        {"prompt_ids": [2, 7], "completion_ids": [30, 31, 32, 1]},
        {"prompt_ids": [2], "completion_ids": [40, 1]},
    ]
    batch = as_lists(PreferenceCollator(0, "sft", 4, packing=True, row_length=4)(rows))
    # the 6-token row gets a row of its own; rows padded to 6, then to a multiple of 4
    assert batch["packed_input_ids"] == [[2, 7, 30, 31, 32, 1, 0, 0], [2, 40, 1, 0, 0, 0, 0, 0]]
    assert batch["target_ids"] == [30, 31, 32, 1, 40, 1]
    assert batch["target_sequence"] == [0, 0, 0, 0, 1, 1]
    assert batch["last_index"] == [5, 10]
    assert "pair_sequences" not in batch


def test_passthrough_columns_stay_per_row():
    rows = [
        {**PAIR, "margin": 0.5, "sample_weight": 1.0},
        {**OTHER, "margin": 2.0, "sample_weight": 0.0},
    ]
    batch = PreferenceCollator(0, "pairs", packing=True, share_prompt=True, row_length=16)(rows)
    assert batch["margin"].tolist() == [0.5, 2.0] and batch["sample_weight"].tolist() == [1.0, 0.0]
    assert batch["packed_input_ids"].shape == (1, 14)


def test_layout_settings_are_checked():
    with pytest.raises(ValueError, match="share_prompt: only pairs share a prompt, not mode 'sft'"):
        PreferenceCollator(0, "sft", share_prompt=True)
    with pytest.raises(ValueError, match="packing: prompts are left-padded for generation"):
        PreferenceCollator(0, "prompts", packing=True, row_length=8)
    with pytest.raises(
        ValueError, match=r"packing_length must be >= 2 \(or None: one row\), got 1"
    ):
        PreferenceCollator(0, "pairs", packing=True, row_length=1)
    one_row = PreferenceCollator(0, "pairs", packing=True)([PAIR, PAIR, PAIR])  # the default
    assert one_row["packed_input_ids"].shape[0] == 1
    assert torch.is_tensor(PreferenceCollator(0, "pairs")([PAIR])["chosen_input_ids"])
