"""Tests for prefl.data.datamodule.PreferenceDataModule: modes, stats and logged summary, counted
drops, column checks, sources (files, folder, in-memory), splits, tokenizers, and the real
Anthropic HH-RLHF harmless test file (skipped where ``../shared`` is absent).

Toy-tokenizer ids: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2; words via ``convert_tokens_to_ids``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from prefl.data import PreferenceDataModule, RowError
from prefl.data.formats import ASSISTANT_MARKER, split_implicit
from prefl.data.tokenizers import build_toy_tokenizer, load_tokenizer
from prefl.tasks.toy import TOY_SIZES

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"

PAIRS = [
    {"prompt": "happily , the movie was", "chosen": "great fun", "rejected": "bad"},
    {"prompt": "sadly , the film is", "chosen": "good", "rejected": "dull and flat"},
    {"prompt": "honestly , the cast felt", "chosen": "moving", "rejected": "weak"},
]


@pytest.fixture
def summary_log(caplog):
    """Capture rank_zero_info lines.

    Lightning stops ``lightning.pytorch`` from propagating when it installs its own handler (no
    root handler at import time); then caplog's root handler sees nothing, so attach it directly.
    """
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    caplog.set_level(logging.INFO, logger=RANK_ZERO_LOGGER)
    node, reaches_root = logger, True
    while node is not None:
        reaches_root = reaches_root and node.propagate
        node = node.parent
    if not reaches_root:
        logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def summary_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefl data")]


def ids(text: str) -> list[int]:
    return build_toy_tokenizer().convert_tokens_to_ids(text.split())


def numbered_pairs(n: int) -> list[dict]:
    """``n`` distinct pair rows; row i's prompt ends in ``i`` copies of "very" (unique text)."""
    return [
        {"prompt": "overall , the plot was" + " very" * i, "chosen": "good", "rejected": "bad"}
        for i in range(n)
    ]


def fitted(rows: list[dict], **kwargs) -> PreferenceDataModule:
    """A PreferenceDataModule on the in-memory ``rows``, set up for fit."""
    dm = PreferenceDataModule(datasets.Dataset.from_list(rows), **kwargs)
    dm.setup("fit")
    return dm


def fails_setup(dm: PreferenceDataModule, text: str, error: type = ValueError) -> None:
    """``dm.setup("fit")`` raises ``error`` with ``text`` (literally) in its message."""
    with pytest.raises(error, match=re.escape(text)):
        dm.setup("fit")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- toy task, modes


@pytest.mark.parametrize(
    ("mode", "columns", "keys"),
    [
        (
            "pairs",
            {"prompt_ids", "chosen_ids", "rejected_ids"},
            {
                f"{n}_{k}"
                for n in ("chosen", "rejected")
                for k in ("input_ids", "attention_mask", "loss_mask")
            },
        ),
        ("sft", {"prompt_ids", "completion_ids"}, {"input_ids", "attention_mask", "loss_mask"}),
        (
            "prompts",
            {"prompt", "prompt_ids", "row", "prompt_source"},
            {"prompt_input_ids", "prompt_attention_mask", "prompt", "row", "prompt_source"},
        ),
    ],
)
def test_toy_setup_fit_each_mode(summary_log, mode, columns, keys):
    dm = PreferenceDataModule("toy", mode=mode, batch_size=4)
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "validation"}
    sizes = TOY_SIZES[mode]
    assert dm.stats == {
        split: {"read": sizes[split], "used": sizes[split], "truncated": 0, "dropped": {}}
        for split in ("train", "validation")
    }
    assert set(dm.datasets["train"].column_names) == columns
    assert summary_lines(summary_log) == [
        f"prefl data [train]: read {sizes['train']}, used {sizes['train']}, truncated 0, "
        "dropped 0 (none)",
        f"prefl data [validation]: read {sizes['validation']}, used {sizes['validation']}, "
        "truncated 0, dropped 0 (none)",
    ]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == keys
    first = next(iter(dm.val_dataloader()))
    assert set(first) == keys
    # The test split is not built by setup("fit").
    with pytest.raises(ValueError, match="no 'test' split"):
        dm.test_dataloader()
    dm.setup("test")
    assert dm.stats["test"]["read"] == sizes["test"]


def test_toy_pairs_batch_content():
    dm = PreferenceDataModule("toy", mode="pairs", batch_size=4, max_samples=4)
    dm.setup("validate")
    assert set(dm.datasets) == {"validation"}
    batch = next(iter(dm.val_dataloader()))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert (batch["chosen_input_ids"][:, 0] == 2).all()  # BOS first, right padding
    # Every row ends its completion with exactly one EOS, the last real token.
    for side in ("chosen", "rejected"):
        for row, mask in zip(
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], strict=True
        ):
            real = row[: int(mask.sum())].tolist()
            assert real[-1] == 1 and real.count(1) == 1


def test_toy_truncation_counted(summary_log):
    # Toy pair rows: 6 prompt ids, completions 4-11 ids; max_length 10 cuts some of them.
    dm = PreferenceDataModule("toy", mode="pairs", max_samples=64, max_length=10)
    dm.setup("fit")
    s = dm.stats["train"]
    assert s["read"] == 64 and s["read"] == s["used"] + sum(s["dropped"].values())
    assert 0 < s["truncated"] <= s["used"]
    assert set(s["dropped"]) <= {"identical_after_truncation"}
    lengths = [
        len(p) + len(c)
        for p, c in zip(
            dm.datasets["train"]["prompt_ids"], dm.datasets["train"]["chosen_ids"], strict=True
        )
    ]
    assert max(lengths) == 10


# --------------------------------------------------------------------------- drops


DROP_ROWS = [
    # 0: kept, exactly fits max_length 7 (5 prompt ids + 2).
    {"prompt": "sadly , the film", "chosen": "bad", "rejected": "good"},
    # 1: chosen == rejected.
    {"prompt": "sadly , the film", "chosen": "dull", "rejected": "dull"},
    # 2: 8 prompt ids >= max_length 7.
    {"prompt": "happily , the movie was great fun", "chosen": "good", "rejected": "bad"},
    # 3: both completions cut to "great fun".
    {"prompt": "happily , the movie", "chosen": "great fun good", "rejected": "great fun bad"},
    # 4: kept, chosen cut to "great fun".
    {"prompt": "happily , the movie", "chosen": "great fun good", "rejected": "bad"},
]
DROPPED = {"identical": 1, "identical_after_truncation": 1, "prompt_too_long": 1}


def test_drops_are_counted_and_logged(summary_log):
    dm = fitted(DROP_ROWS, max_length=7, max_prompt_length=None)
    assert set(dm.datasets) == {"train"}
    s = dm.stats["train"]
    assert s == {"read": 5, "used": 2, "truncated": 1, "dropped": DROPPED}
    assert s["read"] == s["used"] + sum(s["dropped"].values())
    assert summary_lines(summary_log) == [
        "prefl data [train]: read 5, used 2, truncated 1, dropped 3 "
        "(identical=1, identical_after_truncation=1, prompt_too_long=1)"
    ]
    kept = dm.datasets["train"]
    assert kept.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert kept["chosen_ids"] == [[*ids("bad"), 1], ids("great fun")]
    assert kept["rejected_ids"] == [[*ids("good"), 1], [*ids("bad"), 1]]
    assert dm.val_dataloader() == []


def test_error_on_drop_names_reasons_and_rows():
    dm = PreferenceDataModule(
        datasets.Dataset.from_list(DROP_ROWS),
        max_length=7,
        max_prompt_length=None,
        error_on_drop=True,
    )
    msg = (
        "split 'train': 3 row(s) would be dropped (identical=1, identical_after_truncation=1, "
        "prompt_too_long=1); first rows [1, 2, 3] (error_on_drop=True)"
    )
    fails_setup(dm, msg)


def test_error_on_drop_without_drops_is_quiet():
    dm = fitted(PAIRS, error_on_drop=True)
    assert dm.stats["train"] == {"read": 3, "used": 3, "truncated": 0, "dropped": {}}


def test_everything_dropped_is_an_error():
    rows = [{"prompt": "sadly , the film", "chosen": "dull", "rejected": "dull"}] * 2
    dm = PreferenceDataModule(datasets.Dataset.from_list(rows))
    fails_setup(dm, "split 'train' is empty after filtering (identical=2)")


def test_row_error_surfaces_from_setup():
    rows = [*PAIRS, {"prompt": "sadly , the film", "chosen": None, "rejected": "dull"}]
    dm = PreferenceDataModule(datasets.Dataset.from_list(rows))
    fails_setup(dm, "split 'train', row 3, column 'chosen'", RowError)


def test_margin_column_reaches_the_batch():
    rows = [{**r, "margin": float(i)} for i, r in enumerate(PAIRS)]
    dm = PreferenceDataModule(datasets.Dataset.from_list(rows), batch_size=3)
    dm.setup("test")  # no test split: nothing built
    assert dm.datasets == {}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["margin"].dtype == torch.float32
    assert sorted(batch["margin"].tolist()) == [0.0, 1.0, 2.0]


# --------------------------------------------------------------------------- columns


def test_missing_column_lists_expected_and_found():
    ds = datasets.Dataset.from_list([{"prompt": "sadly , the film", "completion": "dull"}])
    dm = PreferenceDataModule(ds, mode="pairs")
    msg = (
        "split 'train' lacks column(s) ['chosen', 'rejected']: mode 'pairs' with format "
        "'explicit' expects ['prompt', 'chosen', 'rejected'], found ['prompt', 'completion']"
    )
    fails_setup(dm, msg)


def test_missing_column_with_named_format():
    ds = datasets.Dataset.from_list([{"prompt": "sadly , the film", "answer": "dull"}])
    dm = PreferenceDataModule(ds, mode="sft", row_format="explicit")
    fails_setup(dm, "expects ['prompt', 'chosen'], found ['prompt', 'answer']")


def test_undetectable_format():
    ds = datasets.Dataset.from_list([{"text": "sadly , the film"}])
    fails_setup(PreferenceDataModule(ds), "cannot detect the row format")


def test_remapped_column_names():
    ref = fitted(PAIRS)
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in PAIRS]
    dm = fitted(renamed, prompt_column="question", chosen_column="good", rejected_column="bad")
    assert dm.datasets["train"].to_list() == ref.datasets["train"].to_list()
    sft_rows = [{"question": r["prompt"], "answer": r["chosen"]} for r in PAIRS]
    sft = fitted(sft_rows, mode="sft", prompt_column="question", completion_column="answer")
    assert list(sft.datasets["train"]["completion_ids"]) == list(
        ref.datasets["train"]["chosen_ids"]
    )


def test_implicit_and_conversational_rows_through_the_module():
    implicit = [
        {"chosen": r["prompt"] + " " + r["chosen"], "rejected": r["prompt"] + " " + r["rejected"]}
        for r in PAIRS
    ]
    dm = fitted(implicit)
    ref = fitted(PAIRS)
    # Whitespace fallback: prompt "happily , the movie was", replies " great fun" / " bad".
    assert dm.datasets["train"].to_list() == ref.datasets["train"].to_list()

    conv = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in PAIRS
    ]
    dm = fitted(conv)
    user, asst = build_toy_tokenizer().convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    first = dm.datasets["train"][0]
    assert first["prompt_ids"] == [2, user, *ids(PAIRS[0]["prompt"]), 1, asst]
    assert first["chosen_ids"] == [*ids("great fun"), 1]
    assert first["rejected_ids"] == [*ids("bad"), 1]


# --------------------------------------------------------------------------- sources


def _write(path: Path, rows: list[dict]) -> None:
    ext = "".join(path.suffixes)
    if ext == ".jsonl":
        write_jsonl(path, rows)
    elif ext == ".jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif ext == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif ext == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif ext == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))


@pytest.mark.parametrize(
    "name", ["rows.jsonl", "rows.json", "rows.csv", "rows.parquet", "rows.jsonl.gz"]
)
def test_local_file_sources(tmp_path, name):
    path = tmp_path / name
    _write(path, PAIRS)
    dm = PreferenceDataModule(str(path), cache_dir=str(tmp_path / "cache"), batch_size=8)
    raw = dm.load_raw()
    assert list(raw) == ["train"]
    assert raw["train"].to_list() == PAIRS
    dm.setup("fit")
    assert dm.stats == {"train": {"read": 3, "used": 3, "truncated": 0, "dropped": {}}}
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_input_ids"].shape == (3, 10)  # longest: 6 prompt + 3 + EOS


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n")
    with pytest.raises(
        ValueError,
        match=r"unsupported type; expected one of \['.csv', '.json', '.jsonl', '.parquet'\]",
    ):
        PreferenceDataModule(str(path), cache_dir=str(tmp_path / "cache")).load_raw()


def test_folder_source_with_train_and_test(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS)
    write_jsonl(folder / "test.jsonl", PAIRS[::-1])
    dm = PreferenceDataModule(
        str(folder), cache_dir=str(tmp_path / "cache"), mode="prompts", eval_batch_size=2
    )
    assert sorted(dm.load_raw()) == ["test", "train"]
    dm.setup("fit")
    assert set(dm.datasets) == {"train"}
    dm.setup("test")
    assert dm.stats["test"] == {"read": 3, "used": 3, "truncated": 0, "dropped": {}}
    prompts = [p for batch in dm.test_dataloader() for p in batch["prompt"]]
    assert prompts == [r["prompt"] for r in PAIRS[::-1]]


def test_in_memory_dataset_and_dataset_dict():
    ds = datasets.Dataset.from_list(PAIRS)
    dm = PreferenceDataModule(ds)
    assert list(dm.load_raw()) == ["train"]
    assert "dataset" not in dm.hparams  # objects are not saved as hyperparameters
    dd = datasets.DatasetDict(
        {"train": ds, "validation": ds.select([0]), "test": ds.select([1, 2])}
    )
    dm = PreferenceDataModule(dd)
    dm.setup()
    assert {k: v["read"] for k, v in dm.stats.items()} == {"train": 3, "validation": 1, "test": 2}


def test_hparams_record_string_sources(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", PAIRS)
    dm = PreferenceDataModule(str(path), tokenizer="toy", cache_dir=str(tmp_path / "cache"))
    assert dm.hparams.dataset == str(path) and dm.hparams.tokenizer == "toy"


# --------------------------------------------------------------------------- splits


def test_own_validation_split_is_used():
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(numbered_pairs(10)),
            "validation": datasets.Dataset.from_list(PAIRS),
        }
    )
    dm = PreferenceDataModule(dd, val_fraction=0.5)
    dm.setup("fit")
    assert dm.stats["train"]["read"] == 10 and dm.stats["validation"]["read"] == 3


def test_val_split_none_means_no_validation():
    """``val_split=None`` ignores a validation split that the dataset has: nothing of it is
    tokenized and there are no validation batches (PPO's prompts need none)."""
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(numbered_pairs(10)),
            "validation": datasets.Dataset.from_list(PAIRS),
        }
    )
    dm = PreferenceDataModule(dd, val_split=None)
    dm.setup("fit")
    assert set(dm.datasets) == {"train"} and dm.val_dataloader() == []
    with pytest.raises(ValueError, match=re.escape("val_fraction=0.1 needs a val_split name")):
        PreferenceDataModule(dd, val_split=None, val_fraction=0.1)


def test_renamed_splits():
    dd = datasets.DatasetDict(
        {"tr": datasets.Dataset.from_list(PAIRS), "dev": datasets.Dataset.from_list(PAIRS[:1])}
    )
    dm = PreferenceDataModule(dd, train_split="tr", val_split="dev", test_split="dev")
    dm.setup("fit")
    assert set(dm.datasets) == {"tr", "dev"}
    assert len(dm.val_dataloader()) == 1


def _val_prompts(seed: int) -> list[str]:
    dm = PreferenceDataModule(
        datasets.Dataset.from_list(numbered_pairs(20)), val_fraction=0.25, seed=seed
    )
    splits = dm.splits()
    train, val = list(splits["train"]["prompt"]), list(splits["validation"]["prompt"])
    assert len(train) == 15 and len(val) == 5
    assert sorted(train + val) == sorted(r["prompt"] for r in numbered_pairs(20))
    return val


def test_val_fraction_carve_is_seeded():
    assert _val_prompts(0) == _val_prompts(0)
    assert _val_prompts(0) != _val_prompts(1)


def test_val_fraction_through_setup():
    dm = fitted(numbered_pairs(20), val_fraction=0.25)
    assert dm.stats["train"]["read"] + dm.stats["validation"]["read"] == 20
    assert dm.stats["validation"]["used"] == 5


def test_val_fraction_bounds():
    with pytest.raises(ValueError, match=re.escape("val_fraction must be in [0, 1), got 1.0")):
        PreferenceDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match=re.escape("subset must be in (0, 1], got 0.0")):
        PreferenceDataModule(subset=0.0)


def test_max_samples_keeps_the_first_rows():
    dm = PreferenceDataModule(datasets.Dataset.from_list(numbered_pairs(20)), max_samples=5)
    assert list(dm.splits()["train"]["prompt"]) == [r["prompt"] for r in numbered_pairs(5)]
    dm.setup("fit")
    assert dm.stats["train"]["read"] == 5


def test_subset_is_a_seeded_fraction():
    rows = numbered_pairs(20)

    def picked(seed: int) -> list[str]:
        dm = PreferenceDataModule(datasets.Dataset.from_list(rows), subset=0.5, seed=seed)
        return list(dm.splits()["train"]["prompt"])

    assert len(picked(0)) == 10 and set(picked(0)) <= {r["prompt"] for r in rows}
    assert picked(0) == picked(0) and picked(0) != picked(3)
    both = PreferenceDataModule(datasets.Dataset.from_list(rows), subset=0.5, max_samples=3)
    assert len(both.splits()["train"]) == 3


def test_empty_split_error():
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS), "validation": empty})
    with pytest.raises(ValueError, match="split 'validation' of dataset") as info:
        PreferenceDataModule(dd).setup("fit")
    assert str(info.value).endswith("is empty")


def test_test_and_predict_keep_row_order():
    """Row order, but for predict's prompts, which come longest first (``predict_by_length``,
    tested in tests/data/test_predict_prompts.py) unless that is turned off."""
    rows = numbered_pairs(11)
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS), "test": datasets.Dataset.from_list(rows)}
    )
    dm = PreferenceDataModule(
        dd, mode="prompts", batch_size=2, eval_batch_size=3, predict_by_length=False
    )
    dm.setup("predict")
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        batches = list(loader)
        assert [len(b["prompt"]) for b in batches] == [3, 3, 3, 2]
        assert [p for b in batches for p in b["prompt"]] == [r["prompt"] for r in rows]
    pairs = PreferenceDataModule(dd, mode="pairs", eval_batch_size=4)
    pairs.setup("test")
    lengths = [int(m.sum()) for b in pairs.test_dataloader() for m in b["chosen_attention_mask"]]
    assert lengths == [6 + i + 2 for i in range(11)]  # BOS + 5 words + i "very" + good + EOS


# --------------------------------------------------------------------------- tokenizers


def test_tokenizer_from_local_directory(tmp_path):
    build_toy_tokenizer().save_pretrained(str(tmp_path / "tok"))
    conv = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in PAIRS
    ]
    outputs = []
    for tokenizer in ("toy", str(tmp_path / "tok")):
        dm = PreferenceDataModule(datasets.Dataset.from_list(conv), tokenizer=tokenizer)
        assert (
            dm.tokenizer.pad_token_id,
            dm.tokenizer.eos_token_id,
            dm.tokenizer.bos_token_id,
        ) == (0, 1, 2)
        assert len(dm.tokenizer) == 70  # no pad token added
        dm.setup("fit")
        outputs.append(dm.datasets["train"].to_list())
    assert outputs[0] == outputs[1]


def test_tokenizer_instance_used_as_is():
    tok = build_toy_tokenizer()
    dm = PreferenceDataModule(datasets.Dataset.from_list(PAIRS), tokenizer=tok)
    assert dm.tokenizer is tok and len(tok) == 70
    assert "tokenizer" not in dm.hparams


def test_pad_equal_to_eos_keeps_the_vocabulary(summary_log):
    """PAD == EOS (as in most instruct checkpoints) is kept: no token is added; batches pad with
    the EOS id, and the masks alone tell padding from each row's one real EOS."""
    tok = build_toy_tokenizer()
    size = len(tok)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id == 1
    dm = PreferenceDataModule(datasets.Dataset.from_list(PAIRS), tokenizer=tok, batch_size=3)
    assert dm.tokenizer.pad_token_id == 1 and len(dm.tokenizer) == size
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids_, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    assert (ids_[mask == 0] == 1).all()
    assert (((ids_ == 1) & (mask == 1)).sum(dim=1) == 1).all()  # one real EOS per row
    last = mask.sum(dim=1) - 1  # right padding: each row's last real token is its EOS
    assert (ids_[torch.arange(len(ids_)), last] == 1).all()


def _word_level(
    vocab_words: list[str], pad: bool = True, eos: bool = True
) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<bos>", *(["<eos>"] if eos else []), *(["<pad>"] if pad else [])]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *vocab_words]))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    kwargs = {"eos_token": "<eos>"} if eos else {}
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", unk_token="<unk>", **kwargs
    )


def test_tokenizer_without_pad_pads_with_its_eos():
    tok = _word_level(["a", "b"], pad=False)
    assert tok.pad_token_id is None
    n = len(tok)
    out = load_tokenizer(tok)
    assert out is tok and out.pad_token == out.eos_token and len(out) == n  # nothing added
    # A tokenizer that already has a distinct pad token is left alone.
    tok = _word_level(["a", "b"])
    assert load_tokenizer(tok).pad_token == "<pad>" and len(tok) == n + 1


def test_tokenizer_without_eos_is_an_error():
    with pytest.raises(ValueError, match="has no EOS token"):
        load_tokenizer(_word_level(["a"], eos=False))


# --------------------------------------------------------------------------- real HH-RLHF data


def test_hh_implicit_split_on_every_row(hh_rows):
    rows = hh_rows
    assert len(rows) == 2312
    bad, identical, empty_reply = [], [], []
    for i, row in enumerate(rows):
        chosen, rejected = row["chosen"], row["rejected"]
        if chosen == rejected:
            identical.append(i)
        parts = split_implicit(chosen, rejected)
        if (
            parts is None
            or not parts[0].endswith(ASSISTANT_MARKER)
            or parts[0] + parts[1] != chosen
            or parts[0] + parts[2] != rejected
        ):
            bad.append(i)
        elif not parts[1].strip() or not parts[2].strip():
            empty_reply.append(i)
    assert bad == [], f"{len(bad)} rows split wrongly, first {bad[:10]}"
    # Facts of the file (real mess): no identical pairs; 4 rows whose chosen reply is blank.
    assert len(identical) == 0, f"{len(identical)} rows with chosen == rejected: {identical[:10]}"
    assert len(empty_reply) == 4, f"rows with a blank reply: {empty_reply}"


def test_hh_first_rows_through_the_data_module(tmp_path, summary_log, hh_path, hh_rows):
    rows = hh_rows[:200]
    words = sorted({w for r in rows for text in (r["chosen"], r["rejected"]) for w in text.split()})
    tok = _word_level(words)
    dm = PreferenceDataModule(
        str(hh_path),
        tokenizer=tok,
        mode="pairs",
        max_samples=200,
        max_length=128,
        max_prompt_length=96,
        batch_size=16,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    s = dm.stats["train"]
    assert s["read"] == 200
    assert s["read"] == s["used"] + sum(s["dropped"].values())
    assert 0 < s["truncated"] <= s["used"]
    assert set(s["dropped"]) <= {
        "identical",
        "identical_after_truncation",
        "prompt_too_long",
        "empty_completion",
    }
    # one of the first 200 HH rows has a blank chosen reply: dropped and counted, not an error
    assert s["dropped"].get("empty_completion") == 1
    assert summary_lines(summary_log)[0].startswith(
        f"prefl data [train]: read 200, used {s['used']}, "
    )
    bos, eos, pad, unk = tok.convert_tokens_to_ids(["<bos>", "<eos>", "<pad>", "<unk>"])
    n_rows = 0
    for batch in dm.train_dataloader():
        for side in ("chosen", "rejected"):
            x, att, loss = (
                batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")
            )
            assert x.shape[1] <= 128
            assert (x[:, 0] == bos).all()  # BOS kept through the left cut of long prompts
            assert (x[att == 0] == pad).all() and not (x == unk).any()
            assert (loss <= att).all() and (loss.sum(dim=1) > 0).all()
        n_rows += len(batch["chosen_input_ids"])
    assert n_rows == s["used"]


def test_num_proc_gives_the_same_rows_and_stats(tmp_path):
    def build(num_proc):
        dm = PreferenceDataModule(
            "toy",
            mode="pairs",
            max_samples=64,
            max_length=12,
            max_prompt_length=6,
            num_proc=num_proc,
            cache_dir=str(tmp_path / f"cache{num_proc}"),
        )
        dm.setup("fit")
        return dm

    one, two = build(None), build(2)
    assert one.stats == two.stats
    assert one.stats["train"]["truncated"] > 0  # the limits are tight enough to cut rows
    assert one.datasets["train"].to_list() == two.datasets["train"].to_list()


def test_trust_remote_code_reaches_the_tokenizer_loader(monkeypatch):
    import prefl.data.datamodule as dm_module

    seen = []

    def fake_load(tokenizer, trust_remote_code=False):
        seen.append(trust_remote_code)
        return load_tokenizer("toy")

    monkeypatch.setattr(dm_module, "load_tokenizer", fake_load)
    PreferenceDataModule(tokenizer="some/repo")
    PreferenceDataModule(tokenizer="some/repo", trust_remote_code=True)
    assert seen == [False, True]
