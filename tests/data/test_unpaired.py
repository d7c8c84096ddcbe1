"""Unpaired (KTO) rows: pairs read as unpaired, labelled rows in every format, the mismatched
completion of each row, and the batch, with exact ids (toy tokenizer: ``<bos>`` 2, ``<eos>`` 1)."""

from __future__ import annotations

import datasets
import pytest

from prefl import PreferenceDataModule
from prefl.data.formats import RowError
from prefl.data.unpaired import add_mismatched, explode_pairs, mismatched_rows

BOS, EOS = 2, 1


def test_pairs_explode_into_a_desirable_then_an_undesirable_row():
    batch = {"prompt_ids": [[2, 7], [2, 9]], "chosen_ids": [[30, 1], [50, 1]],
             "rejected_ids": [[40, 1], [60, 1]], "truncated": [False, True]}  # fmt: skip
    out = explode_pairs(batch)
    assert out == {
        "prompt_ids": [[2, 7], [2, 7], [2, 9], [2, 9]],
        "truncated": [False, False, True, True],
        "completion_ids": [[30, 1], [40, 1], [50, 1], [60, 1]],
        "label": [True, False, True, False],
    }


def test_the_mismatched_row_is_half_the_split_away_with_another_prompt():
    # 4 rows: 0 -> 2, 1 -> 3, 2 -> 0, 3 -> 1 (all prompts differ)
    assert mismatched_rows([[1], [2], [3], [4]]) == [2, 3, 0, 1]
    # exploded pairs: rows 0, 1 share a prompt, as do 2, 3: half-way is always another prompt
    assert mismatched_rows([[1], [1], [2], [2]]) == [2, 3, 0, 1]
    # half-way has the same prompt: the next row after it that differs
    assert mismatched_rows([[1], [2], [1], [3]]) == [3, 3, 1, 1]
    assert mismatched_rows([[5], [5]]) == [1, 0]  # nothing differs: the other row anyway


def test_a_mismatched_completion_is_cut_to_fit_max_length():
    ds = datasets.Dataset.from_list(
        [
            {"prompt_ids": [2, 7, 8, 9], "completion_ids": [30, 1]},
            {"prompt_ids": [2], "completion_ids": [40, 41, 42, 1]},
        ]
    )
    assert add_mismatched(ds, max_length=6)["kl_completion_ids"] == [[40, 41], [30, 1]]


def labelled_rows():
    return [
        {"prompt": "happily , the movie was", "completion": "great", "label": True},
        {"prompt": "sadly , the film is", "completion": "bad", "label": False},
        {"prompt": "honestly , the plot felt", "completion": "dull", "label": False},
    ]


def fitted(rows, **kw) -> PreferenceDataModule:
    dm = PreferenceDataModule(datasets.Dataset.from_list(rows), mode="unpaired", batch_size=3, **kw)
    dm.setup("fit")
    return dm


def test_labelled_rows_and_their_batch(tok):
    dm = fitted(labelled_rows())
    ds = dm.datasets["train"]
    words = lambda text: tok.convert_tokens_to_ids(text.split())  # noqa: E731
    assert ds["label"] == [True, False, False]
    assert ds["completion_ids"] == [
        [*words("great"), EOS],
        [*words("bad"), EOS],
        [*words("dull"), EOS],
    ]
    assert ds["kl_completion_ids"] == [
        ds["completion_ids"][1],
        ds["completion_ids"][2],
        ds["completion_ids"][0],
    ]
    assert dm.stats["train"]["labels"] == {"desirable": 1, "undesirable": 2}
    batch = next(iter(dm.val_dataloader())) if "validation" in dm.datasets else None
    assert batch is None  # no validation split here
    loader = dm._loader("train", train=False)
    batch = next(iter(loader))
    assert batch["label"].tolist() == [True, False, False]
    first = [BOS, *words("happily , the movie was")]
    assert batch["input_ids"][0].tolist() == [*first, *words("great"), EOS]
    assert batch["kl_input_ids"][0].tolist() == [*first, *words("bad"), EOS]
    assert batch["kl_loss_mask"][0].tolist() == [0] * 6 + [1, 1]


def test_conversational_labelled_rows(tok):
    rows = [
        {"prompt": [{"role": "user", "content": "the movie was"}],
         "completion": [{"role": "assistant", "content": "great"}], "label": True},
        {"prompt": [{"role": "user", "content": "the film is"}],
         "completion": [{"role": "assistant", "content": "bad"}], "label": False},
    ]  # fmt: skip
    ds = fitted(rows).datasets["train"]
    assert ds["label"] == [True, False]
    assert ds["completion_ids"][0] == [*tok.convert_tokens_to_ids(["great"]), EOS]


def test_toy_pairs_are_read_as_unpaired():
    dm = PreferenceDataModule(mode="unpaired", max_samples=4, batch_size=4)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8
    assert dm.datasets["train"]["label"] == [True, False] * 4
    assert dm.stats["train"]["read"] == 4  # pairs read; each gives two rows


def test_a_label_that_is_not_a_boolean_names_its_row():
    rows = [{**r, "label": "yes" if r["label"] else "no"} for r in labelled_rows()]
    with pytest.raises(RowError, match=r"row 0.*'label'.*expected true or false.*'yes'"):
        fitted(rows)
    with pytest.raises(ValueError, match="mode 'unpaired' needs a boolean 'label' column"):
        fitted([{k: v for k, v in r.items() if k != "label"} for r in labelled_rows()])
    with pytest.raises(ValueError, match="packing: unpaired"):
        PreferenceDataModule(mode="unpaired", packing=True)
