"""The labelling page's store (prefl/labelling/store.py): the order of the items, every decision
on disk before it returns, undo, resume after a kill, one writer per journal, refused double
decisions, and a pairs file that PreferenceDataModule reads as it is."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import write_samples

from prefl import PreferenceDataModule
from prefl.data.pairs import LabelCounts, read_samples
from prefl.data.validate import DataFileError
from prefl.labelling.store import LabelStore, plan_items

TEXT_ROWS = [
    {"id": "a", "prompt": "the movie was", "completions": ["great fun", "awful mess", "fine"],
     "scores": [0.9, -0.5, 0.8]},
    {"id": "b", "prompt": "the film is", "completions": ["boring", "wonderful"]},
    {"id": "c", "prompt": "i think it", "completions": ["good", "bad", "dull"]},
]  # fmt: skip


@pytest.fixture
def rows(tmp_path):
    return read_samples([write_samples(tmp_path / "s.jsonl", TEXT_ROWS)], LabelCounts())


def test_items_come_closest_scored_first_and_in_rounds(rows):
    """Row a has scores (0.9, -0.5, 0.8): its pairs by closeness are 0-2 (0.1), 1-2 (1.3),
    0-1 (1.4); row c has no scores: index order. Round one asks each prompt's first pair."""
    items = plan_items(rows)
    assert [i.id for i in items] == ["a/0-2", "b/0-1", "c/0-1", "a/1-2", "c/0-2", "a/0-1", "c/1-2"]
    assert [i.id for i in plan_items(rows, per_prompt=1)] == ["a/0-2", "b/0-1", "c/0-1"]
    sides = {(i.left, i.right) for i in items if i.id.startswith("c/")}
    assert {tuple(sorted(s)) for s in sides} == {(0, 1), (0, 2), (1, 2)}


def test_left_and_right_are_random_per_item_and_fixed_by_the_seed(rows):
    orders = {seed: [(i.left, i.right) for i in plan_items(rows, seed)] for seed in range(4)}
    assert orders[0] == [(i.left, i.right) for i in plan_items(rows, 0)]
    assert len({tuple(o) for o in orders.values()}) > 1
    swapped = [left > right for order in orders.values() for left, right in order]
    assert any(swapped) and not all(swapped)


def journal(store):
    return [json.loads(x) for x in store.journal_path.read_text().splitlines()]


def test_decide_undo_and_resume(rows, tmp_path):
    out = tmp_path / "pairs.jsonl"
    store = LabelStore(rows, out)
    first, second, third = store.items[:3]
    assert store.decide(first.id, "left") and store.decide(second.id, "right")
    assert store.decide(third.id, "tie")
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    r0, r1 = rows[first.row], rows[second.row]
    assert pairs == [
        {"prompt": r0.prompt, "chosen": r0.completions[first.left],
         "rejected": r0.completions[first.right], "margin": 0.0, "source": "human",
         "id": first.id, "left": first.left, "right": first.right, "chosen_side": "left"},
        {"prompt": r1.prompt, "chosen": r1.completions[second.right],
         "rejected": r1.completions[second.left], "margin": 0.0, "source": "human",
         "id": second.id, "left": second.left, "right": second.right, "chosen_side": "right"},
    ]  # fmt: skip
    assert store.undo() == third.id and store.undo() == second.id
    assert store.next_item() == second
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [first.id]
    assert store.tally() == {"total": 7, "decided": 1, "left": 1, "right": 0, "tie": 0, "skip": 0}
    assert [r.get("undo", r.get("decision")) for r in journal(store)] == [
        "left", "right", "tie", third.id, second.id
    ]  # fmt: skip
    store.decide(second.id, "skip")
    store.close()
    again = LabelStore(rows, out)  # a restart: the same decisions, the next undecided item
    assert again.next_item() == third
    assert again.tally()["decided"] == 2 and again.tally()["skip"] == 1
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [first.id]
    again.close()


def test_a_decided_item_is_refused_and_nothing_is_written(rows, tmp_path):
    store = LabelStore(rows, tmp_path / "pairs.jsonl")
    item = store.items[0]
    assert store.decide(item.id, "left") is True
    before = store.journal_path.read_bytes()
    assert store.decide(item.id, "right") is False
    assert store.journal_path.read_bytes() == before
    with pytest.raises(KeyError):
        store.decide("no/such", "left")
    with pytest.raises(ValueError, match="decision 'maybe'"):
        store.decide(store.items[1].id, "maybe")
    assert store.undo() == item.id and store.undo() is None


def test_two_tabs_deciding_at_once_write_one_decision(rows, tmp_path):
    store = LabelStore(rows, tmp_path / "pairs.jsonl")
    item, results = store.items[0], []
    threads = [
        threading.Thread(target=lambda d=d: results.append(store.decide(item.id, d)))
        for d in ("left", "right") * 4
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert len(journal(store)) == 1
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == 1


def test_a_second_process_cannot_open_the_same_journal(rows, tmp_path):
    store = LabelStore(rows, tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match="another prefl label is writing"):
        LabelStore(rows, tmp_path / "pairs.jsonl")
    store.close()
    LabelStore(rows, tmp_path / "pairs.jsonl").close()


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_pairs_file_rebuilt(rows, tmp_path):
    out = tmp_path / "pairs.jsonl"
    store = LabelStore(rows, out)
    store.decide(store.items[0].id, "left")
    store.close()
    with open(f"{out}.journal", "a") as f:
        f.write('{"id": "b/0-1", "decis')  # the kill came mid-write: never confirmed
    out.write_text(out.read_text() + '{"prompt": "half a li')
    again = LabelStore(rows, out)
    assert again.next_item() == again.items[1]
    assert len(journal(again)) == 1 and len(out.read_text().splitlines()) == 1
    assert again.decide(again.items[1].id, "right")
    assert len(journal(again)) == 2


def test_a_journal_of_other_samples_is_named(rows, tmp_path):
    out = tmp_path / "pairs.jsonl"
    (tmp_path / "pairs.jsonl.journal").write_text(
        '{"id": "a/0-2", "decision": "tie"}\n{"id": "z/0-1", "decision": "left"}\n'
    )
    with pytest.raises(DataFileError, match=r"pairs.jsonl.journal', line 2: item 'z/0-1'"):
        LabelStore(rows, out)


def test_chat_pairs_load_in_preference_data_module(tmp_path, chat_tok):
    prompt = [{"role": "user", "content": "Can you help me?"}]
    rows = read_samples(
        [write_samples(tmp_path / "c.jsonl", [{"prompt": prompt, "completions": ["Sure.", "No"]}])],
        LabelCounts(),
    )
    store = LabelStore(rows, tmp_path / "pairs.jsonl")
    store.decide(store.items[0].id, "left")
    dm = PreferenceDataModule(str(tmp_path / "pairs.jsonl"), chat_tok, val_split=None)
    dm.setup("fit")
    assert dm.stats["train"]["used"] == 1
    row = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert row["prompt"] == prompt and row["chosen"][0]["role"] == "assistant"


def test_text_pairs_load_in_preference_data_module(rows, tmp_path):
    store = LabelStore(rows, tmp_path / "pairs.jsonl")
    for item, decision in zip(store.items[:4], ["left", "right", "tie", "left"], strict=True):
        store.decide(item.id, decision)
    dm = PreferenceDataModule(str(tmp_path / "pairs.jsonl"), "toy", val_split=None)
    dm.setup("fit")
    assert dm.stats["train"]["used"] == 3
