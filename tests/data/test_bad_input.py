"""The bad-input matrix (issue 8): every kind of broken or unusable input either raises an error
that names where it is (file and line; split, row and column; or the config key) or is dropped
and counted by reason in ``datamodule.stats``, and rows in == rows used + rows dropped, for every
split.

Every fixture is written by its test under ``tmp_path`` and loaded through
``PreferenceDataModule(dataset=<path>, tokenizer="toy")``. Texts use the toy lexicon, so the toy
word-level tokenizer encodes them; the HH markers ``Human:`` / ``Assistant:`` of implicit rows
are single ``<unk>`` tokens. Token counts below: a 5-word prompt is 6 ids in explicit format
(BOS + words), 8 in implicit (BOS, Human:, words, Assistant:) and 9 in conversational
(BOS, <|user|>, words, EOS, <|assistant|>).
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from prefl.data import DataFileError, PreferenceDataModule, RowError
from prefl.data.tokenize import DROP_REASONS

H, A = "\n\nHuman:", "\n\nAssistant:"
PROMPTS = ["happily , the movie was", "sadly , the film is", "honestly , the cast felt"]
REPLIES = [("great fun", "bad"), ("good", "dull"), ("moving", "weak")]
PROMPT_IDS = {"explicit": 6, "implicit": 8, "conversational": 9, "conversational-full": 9}
FORMATS = list(PROMPT_IDS)
DEL = object()  # a patch value that removes the key from the row


@pytest.fixture(autouse=True)
def _no_download_count_ping(monkeypatch):
    """``datasets`` pings the hub to count each load, local files included (3 s timeout and a
    DNS lookup, when offline); no test here needs the network."""
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def row(mode: str, fmt: str, i: int = 0, prompt: str = "", chosen: str = "", rejected: str = ""):
    """A good row of ``fmt`` for ``mode``; texts default to the i-th toy prompt and replies."""
    p = prompt or PROMPTS[i % len(PROMPTS)]
    c, r = chosen or REPLIES[i % len(REPLIES)][0], rejected or REPLIES[i % len(REPLIES)][1]
    if fmt == "implicit":
        return {"chosen": f"{H} {p}{A} {c}", "rejected": f"{H} {p}{A} {r}"}
    if fmt == "conversational-full":
        return {"chosen": [user(p), assistant(c)], "rejected": [user(p), assistant(r)]}
    if fmt == "conversational":
        return {
            "pairs": {"prompt": [user(p)], "chosen": [assistant(c)], "rejected": [assistant(r)]},
            "sft": {"messages": [user(p), assistant(c)]},
            "prompts": {"prompt": [user(p)]},
        }[mode]
    return {
        "pairs": {"prompt": p, "chosen": c, "rejected": r},
        "sft": {"prompt": p, "completion": c},
        "prompts": {"prompt": p},
    }[mode]


def patched(base: dict, patch: dict) -> dict:
    out = {**base, **patch}
    return {k: v for k, v in out.items() if v is not DEL}


def write(path: Path, content: list[dict] | str | bytes) -> Path:
    """Write rows (JSON Lines, a JSON list, CSV or parquet by suffix), text or raw bytes."""
    if isinstance(content, list):
        if path.suffix == ".parquet":
            datasets.Dataset.from_list(content).to_parquet(str(path))
            return path
        if path.suffix == ".csv":
            datasets.Dataset.from_list(content).to_csv(str(path), index=False)
            return path
        lines = [json.dumps(content)] if path.suffix == ".json" else map(json.dumps, content)
        content = "".join(line + "\n" for line in lines)
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def build(tmp_path: Path, source, mode: str = "pairs", stage: str = "fit", **kwargs):
    """A data module on ``source`` (a path is given as a string), prepared and set up."""
    dm = PreferenceDataModule(
        dataset=str(source) if isinstance(source, Path) else source,
        mode=mode,
        tokenizer="toy",
        cache_dir=str(tmp_path / "cache"),
        **kwargs,
    )
    dm.prepare_data()
    dm.setup(stage)
    return dm


def where(column: str, index: int = 3, split: str = "train") -> str:
    return re.escape(f"split {split!r}, row {index}, column {column!r}: ")


def assert_accounted(stats: dict) -> None:
    """Rows in == rows used + rows dropped by reason, for every split; reasons are known."""
    for split, s in stats.items():
        assert s["read"] == s["used"] + sum(s["dropped"].values()), (split, s)
        assert set(s["dropped"]) <= set(DROP_REASONS), (split, s)
        assert 0 <= s["truncated"] <= s["used"], (split, s)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "broken",
    [
        '{"prompt": "sadly , the film", "chosen": "bad",',  # cut off
        '{"prompt": "sadly , the film", "chosen": "bad", "rejected": "good",}',  # trailing comma
        "{'prompt': 'sadly , the film', 'chosen': 'bad', 'rejected': 'good'}",  # single quotes
        "sadly , the film was bad",  # not JSON at all
    ],
)
@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, name, broken):
    lines = [json.dumps(row("pairs", "explicit", i)) for i in range(4)]
    lines.insert(2, broken)
    path = write(tmp_path / name, "\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=re.escape(f"dataset file {str(path)!r}, line 3: ")):
        build(tmp_path, path)


def test_malformed_json_document_names_line(tmp_path):
    text = "[\n" + json.dumps(row("pairs", "explicit")) + ",\n" + '{"prompt": "sadly",,}\n]'
    path = write(tmp_path / "rows.json", text)
    with pytest.raises(DataFileError, match=r"rows\.json', line 3: invalid JSON at column 20") as e:
        build(tmp_path, path)
    assert (e.value.path, e.value.line) == (str(path), 3)


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ("5", "int"), ('"bad"', "str")])
def test_jsonl_line_that_is_not_an_object(tmp_path, line, kind):
    path = write(tmp_path / "rows.jsonl", json.dumps(row("pairs", "explicit")) + f"\n{line}\n")
    msg = f"line 2: expected a JSON object (one row per line), got {kind}"
    with pytest.raises(DataFileError, match=re.escape(msg)):
        build(tmp_path, path)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.csv", "rows.json"])
def test_invalid_utf8_names_file_line_and_byte(tmp_path, name):
    good = [row("pairs", "explicit", i) for i in range(2)]
    if name == "rows.csv":
        data = b"prompt,chosen,rejected\nhappily,great,bad\nsadly \xff,good,bad\n"
    elif name == "rows.json":
        data = b"[\n" + json.dumps(good[0]).encode() + b',\n{"prompt": "sadly \xff"}\n]\n'
    else:
        data = "".join(json.dumps(r) + "\n" for r in good).encode() + b'{"prompt": "a\xff"}\n'
    path = write(tmp_path / name, data)
    msg = f"{str(path)!r}, line 3: invalid UTF-8 (byte 0xff at byte offset {data.index(0xFF)})"
    with pytest.raises(DataFileError, match=re.escape(msg)):
        build(tmp_path, path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("rows.jsonl", ""),
        ("rows.jsonl", "\n\n  \n"),
        ("rows.jsonl", "{}\n{}\n"),
        ("rows.jsonl.gz", ""),
        ("rows.json", "[]"),
        ("rows.csv", "prompt,chosen,rejected\n"),
    ],
)
def test_empty_file_is_an_error_naming_it(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(DataFileError, match=re.escape(f"dataset file {str(path)!r}: no rows")):
        build(tmp_path, path)


def test_empty_parquet_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(path))
    with pytest.raises(DataFileError, match=re.escape(f"dataset file {str(path)!r}: no rows")):
        build(tmp_path, path)


def test_ragged_csv_names_line(tmp_path):
    path = write(tmp_path / "rows.csv", "prompt,chosen,rejected\nhappily,great,bad\nsadly,a,b,c\n")
    with pytest.raises(DataFileError, match=r"rows\.csv', line 3: cannot be read: .*saw 4"):
        build(tmp_path, path)


def test_corrupt_parquet_names_file(tmp_path):
    path = write(tmp_path / "rows.parquet", b"PAR1 not really parquet")
    with pytest.raises(DataFileError, match=r"rows\.parquet': cannot be read: .*[Pp]arquet"):
        build(tmp_path, path)


@pytest.mark.parametrize("data_dir", [None, "harmless-base"])
def test_broken_file_in_a_folder_is_the_one_named(tmp_path, data_dir):
    root = tmp_path / "data"
    folder = root / data_dir if data_dir else root
    folder.mkdir(parents=True)
    write(folder / "train.jsonl", [row("pairs", "explicit", i) for i in range(3)])
    write(folder / "test.jsonl", json.dumps(row("pairs", "explicit")) + "\n{oops\n")
    with pytest.raises(DataFileError, match=re.escape(f"{str(folder / 'test.jsonl')!r}, line 2")):
        build(tmp_path, root, data_dir=data_dir)


def test_missing_local_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dataset file 'data/trian\.jsonl' does not exist"):
        build(tmp_path, "data/trian.jsonl")


def test_errors_survive_pickling():
    # datasets.map(num_proc=N) sends a worker's exception back pickled; one that cannot be
    # rebuilt left the pool hanging.
    for err in (RowError("train", 3, "chosen", "bad"), DataFileError("x.jsonl", 2, "bad")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


def test_row_error_from_a_worker_process(tmp_path):
    rows = [row("pairs", "explicit", i) for i in range(8)]
    rows[6]["chosen"] = None
    path = write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(RowError, match=where("chosen", 6) + "expected a non-empty string"):
        build(tmp_path, path, num_proc=2)


# --------------------------------------------------------------------------- columns, config


@pytest.mark.parametrize(
    ("mode", "fmt", "drop", "missing"),
    [
        ("pairs", "explicit", "rejected", "['rejected']"),
        ("pairs", "explicit", "chosen", "['chosen']"),
        ("sft", "explicit", "completion", "['chosen']"),  # no completion: falls back to chosen
        ("pairs", "implicit", "rejected", "['rejected']"),
        ("sft", "implicit", "rejected", "['rejected']"),
        ("pairs", "conversational", "rejected", "['rejected']"),
    ],
)
def test_missing_column(tmp_path, mode, fmt, drop, missing):
    rows = [patched(row(mode, fmt, i), {drop: DEL}) for i in range(3)]
    path = write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(f"split 'train' lacks column(s) {missing}")):
        build(tmp_path, path, mode=mode, row_format=fmt)


def test_misnamed_column_gets_a_suggestion(tmp_path):
    rows = [{"prompt": PROMPTS[0], "chosen": "good", "reject": "bad"}]
    path = write(tmp_path / "rows.jsonl", rows)
    msg = "found ['prompt', 'chosen', 'reject'] (did you mean rejected_column='reject'?)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        build(tmp_path, path)
    dm = build(tmp_path, path, rejected_column="reject")  # the suggested fix works
    assert dm.stats["train"]["used"] == 1


def test_unknown_column_names_cannot_be_detected(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"question": PROMPTS[0], "good": "good", "bad": "bad"}])
    msg = "split 'train', row 0: cannot detect the row format"
    with pytest.raises(ValueError, match=re.escape(msg) + r".*found \['bad', 'good', 'question'\]"):
        build(tmp_path, path)


def test_remapped_column_that_is_not_there(tmp_path):
    path = write(tmp_path / "rows.jsonl", [row("pairs", "explicit")])
    with pytest.raises(ValueError, match=re.escape("lacks column(s) ['good']")):
        build(tmp_path, path, chosen_column="good")
    with pytest.raises(ValueError, match=re.escape("margin_column='score'")):
        build(tmp_path, path, margin_column="score")


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"row_format": "hh"}, "row_format must be one of"),
        ({"mode": "dpo"}, "mode must be one of ['pairs', 'prompts', 'sft', 'unpaired'], got 'dpo'"),
        ({"max_samples": 0}, "max_samples must be >= 1"),
    ],
)
def test_bad_config_names_the_key(kwargs, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        PreferenceDataModule(dataset="toy", tokenizer="toy", **kwargs)


def test_missing_train_split_is_named_at_setup(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "test.jsonl", [row("pairs", "explicit")])
    with pytest.raises(ValueError, match=re.escape("has no 'train' split (found ['test'])")):
        build(tmp_path, folder)


# --------------------------------------------------------------------------- rows: errors

ROW_ERRORS = [
    # explicit
    ("pairs", "explicit", {"chosen": None}, "chosen", "expected a non-empty string, got None"),
    ("pairs", "explicit", {"rejected": DEL}, "rejected", "expected a non-empty string, got None"),
    ("pairs", "explicit", {"chosen": 5}, "chosen", "got int"),
    ("pairs", "explicit", {"rejected": 0.5}, "rejected", "got float"),
    ("pairs", "explicit", {"chosen": True}, "chosen", "got bool"),
    ("pairs", "explicit", {"chosen": ["great", "fun"]}, "chosen", "got list"),
    ("pairs", "explicit", {"prompt": {"text": "sadly"}}, "prompt", "got dict"),
    ("pairs", "explicit", {"prompt": ""}, "prompt", "got an empty one"),
    ("pairs", "explicit", {"chosen": " \n "}, "chosen", "got an empty one"),
    ("sft", "explicit", {"completion": None}, "completion", "got None"),
    ("sft", "explicit", {"completion": 3}, "completion", "got int"),
    ("sft", "explicit", {"completion": ""}, "completion", "got an empty one"),
    ("sft", "explicit", {"prompt": ["sadly"]}, "prompt", "got list"),
    ("prompts", "explicit", {"prompt": None}, "prompt", "got None"),
    ("prompts", "explicit", {"prompt": 7}, "prompt", "got int"),
    ("prompts", "explicit", {"prompt": "  "}, "prompt", "got an empty one"),
    # implicit (HH style)
    ("pairs", "implicit", {"chosen": None}, "chosen", "got None"),
    ("pairs", "implicit", {"rejected": 5}, "rejected", "got int"),
    ("pairs", "implicit", {"chosen": ["great"]}, "chosen", "got list"),
    ("pairs", "implicit", {"rejected": ""}, "rejected", "got an empty one"),
    ("pairs", "implicit", {"chosen": "great fun", "rejected": "bad"}, "chosen", "share no prompt"),
    (
        "pairs",
        "implicit",
        {"chosen": f"{H} happily{A} good", "rejected": f"{H} sadly{A} bad"},
        "chosen",
        "share no prompt",
    ),
    ("sft", "implicit", {"rejected": None}, "rejected", "got None"),
    ("prompts", "implicit", {"chosen": 1.5}, "chosen", "got float"),
    # conversational: prompt + reply lists
    (
        "pairs",
        "conversational",
        {"chosen": [{"role": "bot", "content": "good"}]},
        "chosen",
        "message 0 has unknown role 'bot'",
    ),
    (
        "pairs",
        "conversational",
        {"rejected": [user("bad")]},
        "rejected",
        "does not end with an assistant turn",
    ),
    (
        "pairs",
        "conversational",
        {"chosen": [{"role": "assistant", "content": None}]},
        "chosen",
        "message 0 content is not a string (got None)",
    ),
    ("pairs", "conversational", {"chosen": []}, "chosen", "got an empty list"),
    ("pairs", "conversational", {"chosen": "great fun"}, "chosen", "messages, got str"),
    ("pairs", "conversational", {"prompt": None}, "prompt", "messages, got None"),
    ("pairs", "conversational", {"chosen": [assistant(" ")]}, "chosen", "assistant turn is empty"),
    # conversational: full conversations
    (
        "pairs",
        "conversational-full",
        {"rejected": [user("sadly"), assistant("bad"), user("then")]},
        "rejected",
        "does not end with an assistant turn",
    ),
    (
        "pairs",
        "conversational-full",
        {"rejected": [user("alas"), assistant("bad")]},
        "rejected",
        "the conversations differ before their last turn",
    ),
    (
        "pairs",
        "conversational-full",
        {"chosen": [assistant("good")], "rejected": [assistant("bad")]},
        "chosen",
        "no prompt: the conversation has a single turn",
    ),
    (
        "sft",
        "conversational",
        {"messages": [user("sadly")]},
        "messages",
        "the conversation does not end with an assistant turn",
    ),
    (
        "sft",
        "conversational",
        {"messages": [{"role": "human", "content": "sadly"}, assistant("bad")]},
        "messages",
        "unknown role 'human'",
    ),
    ("prompts", "conversational", {"prompt": []}, "prompt", "got an empty list"),
    (
        "prompts",
        "conversational",
        {"prompt": [{"role": "narrator", "content": "sadly"}]},
        "prompt",
        "unknown role 'narrator'",
    ),
]


def _case_id(case: tuple) -> str:
    mode, fmt, patch, column, _ = case
    values = ",".join("del" if v is DEL else type(v).__name__ for v in patch.values())
    return f"{mode}-{fmt}-{'+'.join(patch)}={values}"


@pytest.mark.parametrize(
    ("mode", "fmt", "patch", "column", "problem"), ROW_ERRORS, ids=map(_case_id, ROW_ERRORS)
)
def test_bad_row_is_an_error_naming_split_row_and_column(
    tmp_path, mode, fmt, patch, column, problem
):
    rows = [row(mode, fmt, i) for i in range(5)]
    rows[3] = patched(rows[3], patch)
    path = write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(RowError, match=where(column) + ".*" + re.escape(problem)) as info:
        build(tmp_path, path, mode=mode)
    assert (info.value.split, info.value.index, info.value.column) == ("train", 3, column)


def test_list_where_a_string_belongs_in_the_first_row(tmp_path):
    # A list of strings is not a conversation: the row is explicit with a wrong-typed field.
    rows = [patched(row("pairs", "explicit"), {"chosen": ["great"]}), row("pairs", "explicit", 1)]
    path = write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(
        RowError, match=where("chosen", 0) + "expected a non-empty string, got list"
    ):
        build(tmp_path, path)


@pytest.mark.parametrize("name", ["rows.json", "rows.csv", "rows.parquet"])
def test_numbers_where_strings_belong_in_typed_files(tmp_path, name):
    # A whole column of numbers is read as a number column: row 0 is the first bad row.
    rows = [{"prompt": PROMPTS[i], "chosen": i + 1, "rejected": "bad"} for i in range(3)]
    path = write(tmp_path / name, rows)
    with pytest.raises(RowError, match=where("chosen", 0) + "expected a non-empty string, got int"):
        build(tmp_path, path)


def test_empty_csv_field_is_a_missing_value(tmp_path):
    path = write(tmp_path / "rows.csv", "prompt,chosen,rejected\nhappily,great,bad\nsadly,,bad\n")
    with pytest.raises(
        RowError, match=where("chosen", 1) + "expected a non-empty string, got None"
    ):
        build(tmp_path, path)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "None"), ("high", "'high'"), (True, "True"), (float("nan"), "nan"), ([1], "[1]")],
)
def test_bad_margin_is_an_error(tmp_path, value, shown):
    rows = [{**row("pairs", "explicit", i), "margin": 1.0} for i in range(5)]
    rows[3]["margin"] = value
    path = write(tmp_path / "rows.jsonl", rows)
    msg = f"expected a finite number, got {shown}"
    with pytest.raises(RowError, match=where("margin") + re.escape(msg)):
        build(tmp_path, path)


@pytest.mark.parametrize("how", ["val_fraction", "subset"])
def test_row_index_is_the_source_row_after_a_shuffle(tmp_path, how):
    rows = [row("pairs", "explicit", i, prompt=PROMPTS[0] + " very" * i) for i in range(20)]
    rows[17]["chosen"] = None
    path = write(tmp_path / "rows.jsonl", rows)
    kwargs = {"val_fraction": 0.5} if how == "val_fraction" else {"subset": 1.0, "seed": 3}
    with pytest.raises(RowError, match=where("chosen", 17)):
        build(tmp_path, path, **kwargs)


# --------------------------------------------------------------------------- rows: drops


def _setup_with_row3(tmp_path, mode, fmt, bad: dict, **kwargs):
    rows = [row(mode, fmt, i) for i in range(5)]
    rows[3] = bad
    dm = build(tmp_path, write(tmp_path / "rows.jsonl", rows), mode=mode, **kwargs)
    assert_accounted(dm.stats)
    return dm.stats["train"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_chosen_equal_to_rejected_is_dropped(tmp_path, fmt):
    same = row("pairs", fmt, chosen="good", rejected="good")
    s = _setup_with_row3(tmp_path, "pairs", fmt, same)
    assert s == {"read": 5, "used": 4, "truncated": 0, "dropped": {"identical": 1}}


@pytest.mark.parametrize(
    ("mode", "fmt"), [("sft", "implicit"), ("prompts", "implicit"), ("prompts", "explicit")]
)
def test_chosen_equal_to_rejected_is_kept_where_no_pair_is_needed(tmp_path, mode, fmt):
    base = "pairs" if fmt == "explicit" else mode  # explicit pair rows carry chosen/rejected
    rows = [row(base, fmt, i) for i in range(5)]
    rows[3] = row(base, fmt, chosen="good", rejected="good")
    dm = build(tmp_path, write(tmp_path / "rows.jsonl", rows), mode=mode)
    assert dm.stats["train"] == {"read": 5, "used": 5, "truncated": 0, "dropped": {}}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["pairs", "sft", "prompts"])
def test_prompt_longer_than_max_prompt_length_is_cut_and_counted(tmp_path, mode, fmt):
    if fmt == "conversational-full" and mode != "pairs":
        pytest.skip("full conversations are pair rows")
    long = row(mode, fmt, prompt=PROMPTS[0] + " very" * 12)
    limit = PROMPT_IDS[fmt] + 1
    s = _setup_with_row3(tmp_path, mode, fmt, long, max_prompt_length=limit)
    assert s == {"read": 5, "used": 5, "truncated": 1, "dropped": {}}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["pairs", "sft"])
def test_prompt_that_leaves_no_room_is_dropped(tmp_path, mode, fmt):
    if fmt == "conversational-full" and mode != "pairs":
        pytest.skip("full conversations are pair rows")
    long = row(mode, fmt, prompt=PROMPTS[0] + " very" * 12)
    limits = {"max_length": PROMPT_IDS[fmt] + 3, "max_prompt_length": None}
    s = _setup_with_row3(tmp_path, mode, fmt, long, **limits)
    assert s["dropped"] == {"prompt_too_long": 1} and s["used"] == 4


def test_prompts_mode_keeps_a_prompt_longer_than_max_length(tmp_path):
    # Prompts mode has no completion to make room for; only max_prompt_length cuts prompts.
    long = row("prompts", "explicit", prompt=PROMPTS[0] + " very" * 12)
    s = _setup_with_row3(
        tmp_path, "prompts", "explicit", long, max_length=8, max_prompt_length=None
    )
    assert s == {"read": 5, "used": 5, "truncated": 0, "dropped": {}}


def test_pair_identical_after_truncation_is_dropped(tmp_path):
    cut = row("pairs", "explicit", prompt=PROMPTS[0] + " very", chosen="great fun good")
    cut["rejected"] = "great fun bad"
    s = _setup_with_row3(tmp_path, "pairs", "explicit", cut, max_length=9, max_prompt_length=None)
    assert s["dropped"] == {"identical_after_truncation": 1}


@pytest.mark.parametrize("mode", ["pairs", "sft"])
def test_blank_implicit_reply_is_dropped_as_empty_completion(tmp_path, mode):
    blank = row(mode, "implicit")
    blank["chosen"] = f"{H} {PROMPTS[0]}{A} \n"
    s = _setup_with_row3(tmp_path, mode, "implicit", blank)
    assert s == {"read": 5, "used": 4, "truncated": 0, "dropped": {"empty_completion": 1}}


# --------------------------------------------------------------------------- empty splits


def test_empty_in_memory_dataset(tmp_path):
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    msg = "split 'train' of dataset <in-memory Dataset> is empty"
    with pytest.raises(ValueError, match=re.escape(msg)):
        build(tmp_path, empty)


def test_split_empty_after_filtering(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.jsonl", [row("pairs", "explicit", i) for i in range(3)])
    long = [row("pairs", "explicit", i, prompt=PROMPTS[i] + " very" * 9) for i in range(2)]
    write(folder / "validation.jsonl", long)
    dm = PreferenceDataModule(
        str(folder), max_length=9, max_prompt_length=None, cache_dir=str(tmp_path / "cache")
    )
    msg = "split 'validation' is empty after filtering (prompt_too_long=2)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        dm.setup("fit")
    # The split is still counted: read 2 = used 0 + dropped 2.
    assert dm.stats["validation"] == {
        "read": 2,
        "used": 0,
        "truncated": 0,
        "dropped": {"prompt_too_long": 2},
    }
    assert_accounted(dm.stats)


# --------------------------------------------------------------------------- accounting

#: What each row kind becomes: kept (and cut?) or the reason it is dropped.
KINDS = {
    "good": "",
    "cut": "",  # a completion cut to fit max_length; kept, counted as truncated
    "identical": "identical",
    "too_long": "prompt_too_long",
    "cut_identical": "identical_after_truncation",
    "blank": "empty_completion",  # implicit only: elsewhere a blank field is a RowError
}
SPLIT_KINDS = {
    "train": ["good", "identical", "good", "too_long", "cut_identical", "cut", "blank", "good"],
    "validation": ["identical", "good", "identical", "cut", "good"],
    "test": ["too_long", "good", "blank", "too_long"],
}


def kind_row(fmt: str, kind: str, i: int) -> dict:
    """One pair row of ``fmt``; with max_length = prompt ids + 3, ``kind`` says its fate."""
    more = {"too_long": " very" * 3, "cut": " very", "cut_identical": " very"}.get(kind, "")
    chosen, rejected = {
        "identical": ("good", "good"),
        "cut": ("great fun good", "bad"),
        "cut_identical": ("great fun good", "great fun bad"),
    }.get(kind, REPLIES[i % len(REPLIES)])
    prompt = PROMPTS[i % len(PROMPTS)] + more
    out = row("pairs", fmt, prompt=prompt, chosen=chosen, rejected=rejected)
    if kind == "blank":  # the assistant said nothing (as in 4 real HH rows)
        out["chosen"] = f"{H} {prompt}{A}  "
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_in_equal_rows_used_plus_dropped_for_every_split(tmp_path, fmt):
    folder = tmp_path / "data"
    folder.mkdir()
    expected = {}
    for split, kinds in SPLIT_KINDS.items():
        kinds = [k for k in kinds if k != "blank" or fmt == "implicit"]
        write(folder / f"{split}.jsonl", [kind_row(fmt, k, i) for i, k in enumerate(kinds)])
        fates = [KINDS[k] for k in kinds]
        expected[split] = {
            "read": len(kinds),
            "used": fates.count(""),
            "truncated": kinds.count("cut"),
            "dropped": dict(sorted(Counter(f for f in fates if f).items())),
        }
    dm = build(tmp_path, folder, stage=None, max_length=PROMPT_IDS[fmt] + 3, max_prompt_length=None)
    assert dm.stats == expected
    assert_accounted(dm.stats)
    served = {
        "train": sum(len(b["chosen_input_ids"]) for b in dm.train_dataloader()),
        "validation": sum(len(b["chosen_input_ids"]) for b in dm.val_dataloader()),
        "test": sum(len(b["chosen_input_ids"]) for b in dm.test_dataloader()),
    }
    assert served == {split: s["used"] for split, s in dm.stats.items()}


def test_accounting_holds_across_a_validation_carve(tmp_path):
    kinds = SPLIT_KINDS["train"] * 3
    path = write(tmp_path / "rows.jsonl", [kind_row("implicit", k, i) for i, k in enumerate(kinds)])
    dm = build(tmp_path, path, val_fraction=0.3, max_length=11, max_prompt_length=None)
    assert_accounted(dm.stats)
    assert dm.stats["train"]["read"] + dm.stats["validation"]["read"] == len(kinds)
    total = sum((Counter(s["dropped"]) for s in dm.stats.values()), Counter())
    assert total == Counter(KINDS[k] for k in kinds if KINDS[k])


def test_error_on_drop_names_source_rows_after_a_carve(tmp_path):
    rows = [row("pairs", "explicit", i, prompt=PROMPTS[0] + " very" * i) for i in range(20)]
    for i in (4, 15):
        rows[i]["rejected"] = rows[i]["chosen"]
    path = write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ValueError, match=r"first rows \[(\d+)(, \d+)?\]") as info:
        build(tmp_path, path, val_fraction=0.5, error_on_drop=True)
    named = {int(n) for n in re.findall(r"\d+", str(info.value).split("first rows")[1])}
    assert named and named <= {4, 15}


def _hh_tokenizer(rows: list[dict]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the HH rows' own words (no download), so drops are real."""
    words = sorted({w for r in rows for text in (r["chosen"], r["rejected"]) for w in text.split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", "<eos>", "<pad>", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def test_real_hh_rows_are_all_accounted_for(tmp_path, hh_path, hh_rows):
    rows = hh_rows
    dm = PreferenceDataModule(
        str(hh_path),
        tokenizer=_hh_tokenizer(rows),
        mode="pairs",
        val_fraction=0.1,
        max_length=160,
        max_prompt_length=128,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    assert_accounted(dm.stats)
    assert sum(s["read"] for s in dm.stats.values()) == len(rows) == 2312
    total = sum((Counter(s["dropped"]) for s in dm.stats.values()), Counter())
    # Facts of the file: no identical pairs; 4 blank chosen replies, dropped and counted.
    assert total["identical"] == 0 and total["empty_completion"] == 4
    assert all(s["truncated"] > 0 for s in dm.stats.values())
