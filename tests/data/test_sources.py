"""prefl.data.sources on its own: what a source loads as, and how splits are carved."""

from __future__ import annotations

import datasets
import pytest

from prefl.data.sources import carve_splits, load_source, source_name
from prefl.data.tokenize import SOURCE_ROW


def ten_rows() -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)]})}
    )


def test_a_validation_carve_keeps_every_row_once_with_its_source_index():
    splits = carve_splits(ten_rows(), "train", "validation", 0.2, None, None, seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (8, 2)
    rows = list(splits["train"][SOURCE_ROW]) + list(splits["validation"][SOURCE_ROW])
    assert sorted(rows) == list(range(10))
    for split in splits.values():
        assert list(split["prompt"]) == [f"p{i}" for i in split[SOURCE_ROW]]
    again = carve_splits(ten_rows(), "train", "validation", 0.2, None, None, seed=0)
    assert list(again["validation"][SOURCE_ROW]) == list(splits["validation"][SOURCE_ROW])


def test_no_carve_when_the_split_exists_or_the_fraction_is_zero():
    raw = ten_rows()
    raw["validation"] = raw["train"].select([0])
    splits = carve_splits(raw, "train", "validation", 0.2, None, None, seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (10, 1)
    assert SOURCE_ROW not in splits["train"].column_names  # nothing carved, nothing numbered
    assert list(carve_splits(ten_rows(), "train", "validation", 0.0, None, None, 0)) == ["train"]


def test_subset_then_max_samples():
    subset = carve_splits(ten_rows(), "train", None, 0.0, 0.25, None, seed=0)["train"]
    assert len(subset) == 2  # round(10 * 0.25) = 2, a seeded shuffle
    assert list(subset["prompt"]) == [f"p{i}" for i in subset[SOURCE_ROW]]
    first = carve_splits(ten_rows(), "train", None, 0.0, None, 3, seed=0)["train"]
    assert list(first["prompt"]) == ["p0", "p1", "p2"]
    tiny = carve_splits(ten_rows(), "train", None, 0.0, 0.01, None, seed=0)["train"]
    assert len(tiny) == 1  # at least one row


def test_what_a_source_loads_as(tmp_path):
    rows = ten_rows()["train"]
    assert list(load_source(rows, "pairs", "mine", seed=0)) == ["mine"]
    assert load_source(ten_rows(), "pairs", "train", seed=0)["train"]["prompt"][0] == "p0"
    assert {"train", "validation"} <= set(load_source("toy", "pairs", "train", seed=0))
    missing = tmp_path / "rows.jsonl"
    with pytest.raises(FileNotFoundError, match=r"dataset file '.*rows\.jsonl' does not exist"):
        load_source(str(missing), "pairs", "train", seed=0)
    assert source_name("hh.jsonl") == "'hh.jsonl'"
    assert source_name(rows) == "<in-memory Dataset>"
