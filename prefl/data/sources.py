"""Where a data module's raw rows come from, and how its splits are carved and prepared.

:func:`load_source` reads the source as a ``DatasetDict`` (an in-memory data set, the embedded toy
task, a local file or folder, or a hub id through ``datasets.load_dataset``); :func:`carve_splits`
carves the validation split and applies ``subset`` / ``max_samples``; :func:`prepare_split` turns a
raw split into tokenized rows (format check, HH transcripts to messages, batched tokenizing,
drop accounting; for ``unpaired``, one row per completion). :class:`prefl.PreferenceDataModule`
calls them with its settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from prefl.data.accounting import keep_and_count
from prefl.data.boundary import count_merged
from prefl.data.formats import Columns
from prefl.data.hh import hh_to_conversational
from prefl.data.prompts import add_prompt_sources
from prefl.data.tokenize import Limits, tokenize_batch, with_source_rows
from prefl.data.unpaired import add_mismatched, explode_pairs, label_counts
from prefl.data.validate import check_columns, has_margin, load_local, looks_like_file
from prefl.tasks import toy


def source_name(source: Any) -> str:
    """How errors name a source: the string as given, or the kind of in-memory data set."""
    return repr(source) if isinstance(source, str) else f"<in-memory {type(source).__name__}>"


def load_source(
    source: str | datasets.Dataset | datasets.DatasetDict,
    mode: str,
    train_split: str,
    seed: int,
    name: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """The source as a ``DatasetDict``.

    Args:
        source: ``"toy"``, a local file or folder, a hub id, or an in-memory ``Dataset`` (taken
            as ``train_split``) or ``DatasetDict``.
        mode: The data module's mode (the toy task's rows depend on it).
        train_split: The name an in-memory ``Dataset`` is given.
        seed: Seed of the toy data.
        name: The hub data set's configuration.
        data_dir: Folder inside the hub data set.
        cache_dir: Where ``datasets`` caches what it loads.

    Raises:
        FileNotFoundError: ``source`` looks like a file path that does not exist (the hub is
            not asked for it).
    """
    if isinstance(source, datasets.DatasetDict):
        return source
    if isinstance(source, datasets.Dataset):
        return datasets.DatasetDict({train_split: source})
    if source == "toy":
        rows = toy.toy_splits("pairs" if mode == "unpaired" else mode, seed=seed)
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
    path = Path(source)
    if path.exists():
        return load_local(path, cache_dir, name=name, data_dir=data_dir)
    if looks_like_file(source):
        raise FileNotFoundError(f"dataset file {source!r} does not exist ({path.resolve()})")
    return datasets.load_dataset(source, name=name, data_dir=data_dir, cache_dir=cache_dir)


def carve_splits(
    raw: datasets.DatasetDict,
    train_split: str,
    val_split: str | None,
    val_fraction: float,
    subset: float | None,
    max_samples: int | None,
    seed: int,
) -> dict[str, datasets.Dataset]:
    """The splits after the validation carve, ``subset`` and ``max_samples``. Carved or subset
    rows keep their row index in the source split (for error messages).

    Args:
        raw: The source's splits (:func:`load_source`).
        train_split: The training split's name.
        val_split: The validation split's name; None = no validation.
        val_fraction: Without a ``val_split`` in ``raw``, this fraction of the training rows
            (seeded) becomes it; 0 = none.
        subset: Keep this random fraction (seeded) of every split, at least one row; None = all.
        max_samples: Then keep at most this many rows of every split (the first); None = all.
        seed: Seed of the carve and of ``subset``.
    """
    splits = dict(raw)
    if subset is not None or (val_fraction > 0 and val_split not in splits):
        splits = {split: with_source_rows(ds) for split, ds in splits.items()}
    if val_fraction > 0 and val_split not in splits and train_split in splits:
        parts = splits[train_split].train_test_split(test_size=val_fraction, seed=seed)
        splits[train_split], splits[val_split] = parts["train"], parts["test"]
    for split, ds in splits.items():
        if subset is not None:
            ds = ds.shuffle(seed=seed).select(range(max(1, round(len(ds) * subset))))
        if max_samples is not None:
            ds = ds.select(range(min(len(ds), max_samples)))
        splits[split] = ds
    return splits


@dataclass
class SplitRecipe:
    """How :func:`prepare_split` turns raw rows into tokenized ones (the data module's settings).

    Args:
        mode: ``pairs``, ``prompts``, ``sft`` or ``unpaired``.
        row_format: The row format setting (``auto`` is detected per split).
        columns: The column names.
        tokenizer: The run's tokenizer.
        limits: Length limits.
        error_on_drop: Raise instead of dropping rows.
        num_proc: Processes for the tokenizing ``Dataset.map``.
        source: How errors name the source (:func:`source_name`).
    """

    mode: str
    row_format: str
    columns: Columns
    tokenizer: PreTrainedTokenizerBase
    limits: Limits
    error_on_drop: bool
    num_proc: int | None
    source: str


def prepare_split(
    split: str, ds: datasets.Dataset, recipe: SplitRecipe, stats: dict[str, dict[str, Any]]
) -> datasets.Dataset:
    """The tokenized rows of raw split ``ds``; its row accounting goes to ``stats[split]``.

    Args:
        split: The split's name (in messages and in ``stats``).
        ds: Its raw rows.
        recipe: How to read and tokenize them.
        stats: Where each split's row accounting is kept (the data module's ``stats``).

    Raises:
        ValueError: ``unpaired`` rows with neither a label column nor chosen/rejected pairs, or
            columns that do not fit the row format (see :func:`prefl.data.validate.check_columns`).
    """
    columns, mode = recipe.columns, recipe.mode
    if mode == "unpaired":  # pairs read as unpaired rows, or rows with a label
        mode = "pairs" if columns.rejected in ds.column_names else "sft"
        if mode == "sft" and columns.label not in ds.column_names:
            raise ValueError(
                f"split {split!r}: mode 'unpaired' needs a boolean {columns.label!r} "
                f"column (label_column=), or chosen/rejected pairs; found {ds.column_names}"
            )
    fmt = check_columns(split, ds, mode, recipe.row_format, columns, recipe.source)
    unparsed = None
    if fmt == "hh_chat":  # HH transcripts to message lists; unparsed ones dropped, counted
        ds, unparsed = hh_to_conversational(
            split, ds, mode, columns, recipe.error_on_drop, recipe.num_proc
        )
        fmt = "conversational"
    kwargs = {
        "split": split,
        "mode": mode,
        "row_format": fmt,
        "columns": columns,
        "tokenizer": recipe.tokenizer,
        "limits": recipe.limits,
        "use_margin": has_margin(split, ds.column_names, columns) and recipe.mode != "unpaired",
        "use_label": recipe.mode == "unpaired" and mode == "sft",
    }
    mapped = ds.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        fn_kwargs=kwargs,
        remove_columns=ds.column_names,
        num_proc=recipe.num_proc,
        desc=f"prefl: tokenizing {split}",
    )
    if mode == "prompts":  # row ids and the prompts as given, for samples written from them
        mapped = add_prompt_sources(mapped, ds, fmt, columns)
    kept = keep_and_count(split, ds, mapped, stats, recipe.error_on_drop, unparsed)
    kept = count_merged(split, kept, stats)
    if recipe.mode != "unpaired":
        return kept
    if mode == "pairs":
        kept = kept.map(explode_pairs, batched=True, remove_columns=kept.column_names)
    kept = add_mismatched(kept, recipe.limits.max_length)
    stats[split]["labels"] = label_counts(kept)
    return kept
