"""Length-grouped training batches: ``PreferenceDataModule(group_by_length=True)``."""

from __future__ import annotations

import pytest
import torch

from prefl import PreferenceDataModule
from prefl.data.sampling import (
    WINDOW_BATCHES,
    WeightedDistributedSampler,
    group_by_length,
    row_lengths,
)


def test_group_by_length_sorts_each_window_longest_first_and_keeps_ties_in_order():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    order = [6, 0, 1, 3, 2, 4, 5]
    # windows [6, 0, 1] -> lengths 7, 5, 1; [3, 2, 4] -> 3, 9, 9 (2 before 4: stable); [5]
    assert group_by_length(order, lengths, window=3) == [6, 0, 1, 2, 4, 3, 5]
    assert group_by_length(order, lengths, window=len(order)) == [2, 4, 6, 0, 3, 5, 1]
    assert group_by_length(order, lengths, window=1) == order
    with pytest.raises(ValueError, match="window must be >= 1"):
        group_by_length(order, lengths, window=0)


def test_row_lengths_are_the_prompt_plus_the_longest_completion():
    import datasets

    pairs = datasets.Dataset.from_dict(
        {"prompt_ids": [[1, 2], [1]], "chosen_ids": [[3], [4, 5, 6]], "rejected_ids": [[3, 4], [5]]}
    )
    assert row_lengths(pairs) == [4, 4]
    sft = datasets.Dataset.from_dict({"prompt_ids": [[1, 2, 3]], "completion_ids": [[4]]})
    assert row_lengths(sft) == [4]
    prompts = datasets.Dataset.from_dict({"prompt_ids": [[1, 2, 3], [1]]})
    assert row_lengths(prompts) == [3, 1]


def grouped_sampler(n: int, replicas: int, rank: int, batch: int) -> WeightedDistributedSampler:
    lengths = [(7 * i) % 23 for i in range(n)]
    return WeightedDistributedSampler(
        list(range(n)), replicas, rank, shuffle=True, seed=3, lengths=lengths, batch_size=batch
    )


def test_grouped_sampler_is_the_shuffle_regrouped_and_each_window_sorted():
    n, batch = 250, 2  # window = 50 batches * 2 rows = 100 indices: 3 windows, the last short
    plain = WeightedDistributedSampler(list(range(n)), 1, 0, shuffle=True, seed=3)
    grouped = grouped_sampler(n, 1, 0, batch)
    assert grouped.window == WINDOW_BATCHES * batch == 100
    order, shuffled = list(grouped), list(plain)
    assert sorted(order) == list(range(n))  # nothing dropped or repeated
    for start in (0, 100, 200):  # the same rows per window as the shuffle, sorted
        assert set(order[start : start + 100]) == set(shuffled[start : start + 100])
        window = [grouped.lengths[i] for i in order[start : start + 100]]
        assert window == sorted(window, reverse=True)
    assert order != shuffled


def test_grouped_sampler_under_data_parallel_covers_every_row_once_plus_marked_repeats():
    n, batch = 203, 4  # 2 ranks: 102 each, one marked repeat (index >= n)
    ranks = [list(grouped_sampler(n, 2, r, batch)) for r in range(2)]
    assert [len(r) for r in ranks] == [102, 102]
    real = sorted(i for r in ranks for i in r if i < n)
    assert real == list(range(n))
    assert sum(i >= n for r in ranks for i in r) == 1
    # a step's batches on the two ranks come from one sorted window: similar lengths
    lengths = grouped_sampler(n, 2, 0, batch).lengths
    first = [lengths[i] for r in ranks for i in r[:batch]]
    assert max(first) - min(first) <= 2


def test_grouped_sampler_resumes_mid_epoch_on_the_same_order():
    full = list(grouped_sampler(120, 1, 0, 2))
    resumed = grouped_sampler(120, 1, 0, 2)
    resumed.resume_at(0, 10)
    assert list(resumed) == full[10:]


def padded_positions(group: bool) -> tuple[int, int, list[int]]:
    """Padded and real token positions over one training epoch of toy pairs, and the rows."""
    data = PreferenceDataModule(batch_size=8, group_by_length=group)
    data.setup("fit")
    padded = real = 0
    rows: list[int] = []
    for batch in data.train_dataloader():
        for side in ("chosen", "rejected"):
            mask = batch[f"{side}_attention_mask"]
            padded, real = padded + mask.numel(), real + int(mask.sum())
        rows += batch["chosen_input_ids"][:, 1].tolist()  # first prompt token, for the multiset
    return padded, real, rows


def test_group_by_length_option_cuts_padding_and_keeps_the_rows():
    padded_off, real_off, rows_off = padded_positions(False)
    padded_on, real_on, rows_on = padded_positions(True)
    assert real_on == real_off  # the same tokens are trained on
    assert sorted(rows_on) == sorted(rows_off)
    assert padded_on < 0.95 * padded_off, (padded_on, padded_off)


def test_group_by_length_needs_no_trainer_and_is_off_by_default():
    data = PreferenceDataModule(batch_size=8)
    data.setup("fit")
    assert data.train_dataloader().sampler.lengths is None
    grouped = PreferenceDataModule(batch_size=8, group_by_length=True)
    grouped.setup("fit")
    sampler = grouped.train_dataloader().sampler
    assert sampler.lengths == row_lengths(grouped.datasets["train"])
    evaluation = grouped.val_dataloader().sampler  # row order: no sampler of prefl's
    assert not isinstance(evaluation, WeightedDistributedSampler)
    assert torch.is_tensor(next(iter(grouped.train_dataloader()))["chosen_input_ids"])
