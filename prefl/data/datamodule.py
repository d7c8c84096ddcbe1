"""PreferenceDataModule: one LightningDataModule for every stage (SFT, reward, DPO, PPO).

It loads a source through ``datasets.load_dataset`` (hub id, local file or folder; an in-memory
``Dataset``/``DatasetDict``; or ``"toy"``, the embedded toy task), picks or carves the splits,
turns each row into text (:mod:`prefl.data.formats`), tokenizes with a batched, cached
``Dataset.map`` (:mod:`prefl.data.tokenize`) and pads batches (:mod:`prefl.data.collate`).

Nothing is lost silently: every split logs one line with rows read, used, truncated and dropped
by reason, also kept in :attr:`PreferenceDataModule.stats` (:mod:`prefl.data.accounting`);
``error_on_drop=True`` makes any drop an error instead. Bad input is an error that says where:
a broken local file names the file and line (:mod:`prefl.data.validate`), a bad row its split,
row index (in the source split, also after a shuffle) and column (:class:`RowError`), a bad
setting its key.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from prefl.data.accounting import keep_and_count
from prefl.data.boundary import count_merged
from prefl.data.collate import ROW, PreferenceCollator
from prefl.data.formats import Columns
from prefl.data.hh import hh_to_conversational
from prefl.data.prompts import add_prompt_sources
from prefl.data.sampling import (
    MarkedDataset,
    ResumableTrainData,
    WeightedDistributedSampler,
    choose_sampler,
    row_lengths,
)
from prefl.data.tokenize import Limits, tokenize_batch, with_source_rows
from prefl.data.tokenizers import load_tokenizer
from prefl.data.unpaired import add_mismatched, explode_pairs, label_counts
from prefl.data.validate import (
    check_columns,
    has_margin,
    load_local,
    looks_like_file,
    undecodable,
)
from prefl.tasks import toy

Mode = Literal["pairs", "prompts", "sft", "unpaired"]
RowFormat = Literal["auto", "explicit", "implicit", "conversational", "hh_chat"]


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


class PreferenceDataModule(ResumableTrainData, LightningDataModule):
    """Preference data for every stage: pairs (reward model, DPO), prompts (PPO) or SFT text.

    Args:
        dataset: ``"toy"`` (the embedded toy task), a hub dataset id, a local ``.json``/
            ``.jsonl``/``.parquet``/``.csv`` file (optionally compressed) or folder, or an
            in-memory ``datasets.Dataset``/``DatasetDict``.
        tokenizer: ``"toy"``, a hub id or local directory, a ``.gguf`` file, or a tokenizer
            instance. One without a pad token gets its EOS as PAD (the vocabulary is kept).
        mode: ``pairs`` (chosen/rejected batches), ``prompts`` (left-padded prompts), ``sft``
            (prompt + completion, loss on the completion only) or ``unpaired`` (KTO: prompt +
            completion + boolean label, or pairs read as unpaired rows; see
            :mod:`prefl.data.unpaired`).
        row_format: ``auto`` (detected from the first row), ``explicit``, ``implicit``,
            ``conversational`` (see :mod:`prefl.data.formats`) or ``hh_chat`` (Anthropic HH
            transcripts read as chat messages, rendered with the tokenizer's chat template;
            rows that do not parse are dropped and counted, see :mod:`prefl.data.hh`).
        name: The hub dataset's configuration (its "subset" on the hub), if it has several.
        data_dir: Folder inside the hub dataset to load (e.g. ``harmless-base`` for HH-RLHF).
        prompt_column: Column holding the prompt.
        chosen_column: Column holding the chosen completion (or full chosen text).
        rejected_column: Column holding the rejected completion (or full rejected text).
        completion_column: Column holding the SFT completion (falls back to ``chosen``).
        messages_column: Column holding a whole conversation (SFT, conversational).
        margin_column: Optional numeric column passed through as ``margin`` when present.
        label_column: The boolean desirable / undesirable column of ``unpaired`` rows.
        train_split: Name of the training split.
        val_split: Name of the validation split, used when the dataset has it; None = no
            validation (nothing is tokenized for it, nothing carved).
        test_split: Name of the test split (also used by ``predict``).
        val_fraction: When the dataset has no ``val_split``, carve this fraction of the
            training rows into a validation split (seeded); 0 = no validation.
        subset: Keep this random fraction (seeded) of every split, for quick runs.
        max_samples: Keep at most this many rows of every split (the first ones), for quick runs.
        seed: Seed of the validation carve, of ``subset`` and of the toy data.
        max_length: Most tokens of prompt + completion; completions are cut from the right.
        max_prompt_length: Most prompt tokens; prompts are cut from the left (keeping a BOS
            that the tokenizer puts before every text).
        batch_size: Training batch size (pairs: number of pairs).
        eval_batch_size: Validation/test/predict batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        num_proc: Processes for the tokenizing ``Dataset.map``.
        pad_to_multiple_of: Round padded lengths up to this multiple.
        group_by_length: Training batches of similar lengths, for less padding: each epoch's
            seeded shuffle is cut into windows of 50 batches (per rank) sorted longest first
            (:func:`prefl.data.sampling.group_by_length`); off = the plain shuffle.
        packing: Padding-free batches (``pairs``, ``sft``): the sequences of a batch laid end
            to end in rows of at most ``packing_length`` tokens, positions restarting at each,
            attention never crossing one (:mod:`prefl.data.packing`). The same rows form each
            batch as without packing; only their layout changes.
        share_prompt: Lay each pair out once as ``prompt | chosen | rejected`` (``pairs``): the
            prompt is computed once, and the rejected tokens see only the prompt and
            themselves. With or without ``packing``.
        packing_length: Most tokens per packed row (a longer unit gets a row of its own);
            None = the whole batch in one row. One row is the fastest layout with ``sdpa``
            (attention is computed unit by unit, :mod:`prefl.models.packed`) and with
            flash-attention or flex attention; bound it for ``eager`` attention and for
            sliding-window models, which take a dense ``(L, L)`` mask per row.
        predict_by_length: ``predict`` in ``prompts`` mode serves the prompts longest first
            (rows of equal length in row order), so each ``generate`` call pads its prompts
            little; off = row order. Either way the order is deterministic (no shuffle).
        error_on_drop: Raise instead of dropping rows (identical pairs, rows that cannot fit,
            HH transcripts that do not parse).
        trust_remote_code: Allow a hub tokenizer's own code to run (off by default).
        cache_dir: Where ``datasets`` caches downloads and tokenized splits.
    """

    def __init__(
        self,
        dataset: str | datasets.Dataset | datasets.DatasetDict = "toy",
        tokenizer: str | PreTrainedTokenizerBase = "toy",
        mode: Mode = "pairs",
        row_format: RowFormat = "auto",
        name: str | None = None,
        data_dir: str | None = None,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        completion_column: str = "completion",
        messages_column: str = "messages",
        margin_column: str = "margin",
        label_column: str = "label",
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str = "test",
        val_fraction: float = 0.0,
        subset: float | None = None,
        max_samples: int | None = None,
        seed: int = 0,
        max_length: int = 512,
        max_prompt_length: int | None = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = False,
        packing: bool = False,
        share_prompt: bool = False,
        packing_length: int | None = None,
        predict_by_length: bool = True,
        error_on_drop: bool = False,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        objects = {"dataset": dataset, "tokenizer": tokenizer}
        self.save_hyperparameters(ignore=[k for k, v in objects.items() if not isinstance(v, str)])
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_split is None and val_fraction > 0:
            raise ValueError(f"val_fraction={val_fraction} needs a val_split name, got None")
        if subset is not None and not 0.0 < subset <= 1.0:
            raise ValueError(f"subset must be in (0, 1], got {subset}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 (or None for all rows), got {max_samples}")
        _check_choice("mode", mode, typing.get_args(Mode))
        _check_choice("row_format", row_format, typing.get_args(RowFormat))
        self.dataset = dataset
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.mode, self.row_format = mode, row_format
        self.columns = Columns(
            prompt_column,
            chosen_column,
            rejected_column,
            completion_column,
            messages_column,
            margin_column,
            label_column,
        )
        self.limits = Limits(max_length, max_prompt_length)
        row_length = packing_length
        self.collator = PreferenceCollator(
            self.tokenizer.pad_token_id, mode, pad_to_multiple_of, packing, share_prompt, row_length
        )
        self.datasets: dict[str, datasets.Dataset] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.predict_skip: frozenset[int] = frozenset()

    def prepare_data(self) -> None:
        """Download (or generate) the raw data once, on one process per node."""
        self.load_raw()

    def setup(self, stage: str | None = None) -> None:
        """Split and tokenize what ``stage`` (fit, validate, test, predict) needs."""
        h = self.hparams
        wanted = {
            "fit": [h.train_split, h.val_split],
            "validate": [h.val_split],
            "test": [h.test_split],
            "predict": [h.test_split],
        }.get(stage or "", [h.train_split, h.val_split, h.test_split])
        wanted = [split for split in wanted if split is not None]
        raw = self.splits()
        if stage == "fit" and h.train_split not in raw:
            raise ValueError(
                f"dataset {self._source_name()} has no {h.train_split!r} split (found "
                f"{sorted(raw)}); name the training split with train_split="
            )
        for split in wanted:
            if split in raw and split not in self.datasets:
                try:
                    self.datasets[split] = self._tokenize(split, raw[split])
                except UnicodeDecodeError as err:
                    raise undecodable(self.dataset, split, err) from err

    def load_raw(self) -> datasets.DatasetDict:
        """Load the source as a ``DatasetDict`` (through ``datasets.load_dataset`` for files)."""
        h, source = self.hparams, self.dataset
        if isinstance(source, datasets.DatasetDict):
            return source
        if isinstance(source, datasets.Dataset):
            return datasets.DatasetDict({h.train_split: source})
        if source == "toy":
            mode = "pairs" if self.mode == "unpaired" else self.mode  # pairs read as unpaired
            rows = toy.toy_splits(mode, seed=h.seed)
            return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
        path = Path(source)
        if path.exists():
            return load_local(path, h.cache_dir, name=h.name, data_dir=h.data_dir)
        if looks_like_file(source):  # not a hub id: do not ask the hub for it
            raise FileNotFoundError(f"dataset file {source!r} does not exist ({path.resolve()})")
        return datasets.load_dataset(
            source, name=h.name, data_dir=h.data_dir, cache_dir=h.cache_dir
        )

    def splits(self) -> dict[str, datasets.Dataset]:
        """The raw splits after the validation carve, ``subset`` and ``max_samples``."""
        h = self.hparams
        raw = dict(self.load_raw())
        if h.subset is not None or (h.val_fraction > 0 and h.val_split not in raw):
            raw = {split: with_source_rows(ds) for split, ds in raw.items()}
        if h.val_split not in raw and h.val_fraction > 0 and h.train_split in raw:
            parts = raw[h.train_split].train_test_split(test_size=h.val_fraction, seed=h.seed)
            raw[h.train_split], raw[h.val_split] = parts["train"], parts["test"]
        for split, ds in raw.items():
            if h.subset is not None:
                ds = ds.shuffle(seed=h.seed).select(range(max(1, round(len(ds) * h.subset))))
            if h.max_samples is not None:
                ds = ds.select(range(min(len(ds), h.max_samples)))
            raw[split] = ds
        return raw

    def _source_name(self) -> str:
        source = self.dataset
        return repr(source) if isinstance(source, str) else f"<in-memory {type(source).__name__}>"

    def _tokenize(self, split: str, ds: datasets.Dataset) -> datasets.Dataset:
        h = self.hparams
        mode = self.mode
        if mode == "unpaired":  # pairs read as unpaired rows, or rows with a label
            mode = "pairs" if self.columns.rejected in ds.column_names else "sft"
            if mode == "sft" and self.columns.label not in ds.column_names:
                raise ValueError(
                    f"split {split!r}: mode 'unpaired' needs a boolean {self.columns.label!r} "
                    f"column (label_column=), or chosen/rejected pairs; found {ds.column_names}"
                )
        fmt = check_columns(split, ds, mode, self.row_format, self.columns, self._source_name())
        unparsed = None
        if fmt == "hh_chat":  # HH transcripts to message lists; unparsed ones dropped, counted
            ds, unparsed = hh_to_conversational(
                split, ds, mode, self.columns, h.error_on_drop, h.num_proc
            )
            fmt = "conversational"
        kwargs = {
            "split": split,
            "mode": mode,
            "row_format": fmt,
            "columns": self.columns,
            "tokenizer": self.tokenizer,
            "limits": self.limits,
            "use_margin": has_margin(split, ds.column_names, self.columns)
            and self.mode != "unpaired",
            "use_label": self.mode == "unpaired" and mode == "sft",
        }
        mapped = ds.map(
            tokenize_batch,
            batched=True,
            with_indices=True,
            fn_kwargs=kwargs,
            remove_columns=ds.column_names,
            num_proc=h.num_proc,
            desc=f"prefl: tokenizing {split}",
        )
        if mode == "prompts":  # row ids and the prompts as given, for samples written from them
            mapped = add_prompt_sources(mapped, ds, fmt, self.columns)
        kept = keep_and_count(split, ds, mapped, self.stats, h.error_on_drop, unparsed)
        kept = count_merged(split, kept, self.stats)
        if self.mode != "unpaired":
            return kept
        if mode == "pairs":
            kept = kept.map(explode_pairs, batched=True, remove_columns=kept.column_names)
        kept = add_mismatched(kept, self.limits.max_length)
        self.stats[split]["labels"] = label_counts(kept)
        return kept

    def _split(self, split: str) -> datasets.Dataset:
        if split not in self.datasets:
            raise ValueError(
                f"no {split!r} split: dataset {self.dataset!r} has none (for a "
                "validation split set val_fraction)"
            )
        return self.datasets[split]

    def _loader(
        self,
        split: str,
        train: bool,
        dataset: datasets.Dataset | None = None,
        by_length: bool | None = None,
    ) -> DataLoader:
        """Batches of ``split`` (or of ``dataset``, a selection of its rows), grouped by length
        when ``by_length`` (None: training batches with ``group_by_length``)."""
        h = self.hparams
        dataset = self._split(split) if dataset is None else dataset
        size = h.batch_size if train else (h.eval_batch_size or h.batch_size)
        by_length = train and h.group_by_length if by_length is None else by_length
        sampler, marked = self._sampler(dataset, train, by_length)
        if train and sampler is not None:
            self.train_position.apply(sampler, size)  # a run resumed mid-epoch goes on there
        return DataLoader(
            MarkedDataset(dataset) if marked else dataset,
            batch_size=size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
        )

    def _sampler(
        self, dataset: datasets.Dataset, train: bool, by_length: bool
    ) -> tuple[WeightedDistributedSampler | None, bool]:
        """The sampler of ``dataset`` (grouped by length when ``by_length``), and whether rows
        carry ``sample_weight`` (see :func:`choose_sampler`)."""
        h = self.hparams
        return choose_sampler(
            dataset,
            getattr(self, "trainer", None),
            train,
            seed=int(os.environ.get("PL_GLOBAL_SEED", h.seed)),
            lengths=row_lengths(dataset) if by_length else None,
            batch_size=h.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.hparams.train_split, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in row order; an empty list (no validation) without a split."""
        if self.hparams.val_split not in self.datasets:
            return []
        return self._loader(self.hparams.val_split, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in row order."""
        return self._loader(self.hparams.test_split, train=False)

    def skip_predict_rows(self, rows: Iterable[int]) -> None:
        """Leave these row ids (``row`` of a ``prompts`` batch) out of the next
        ``predict_dataloader``: :class:`prefl.SampleWriter` passes the prompts a previous run
        already wrote, so that a resumed run samples only the others (in full batches)."""
        self.predict_skip = frozenset(int(r) for r in rows)

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``predict``: in row order, or in ``prompts`` mode longest prompt
        first (``predict_by_length``) and without the rows of :meth:`skip_predict_rows`."""
        split = self.hparams.test_split
        dataset = self._split(split)
        if self.mode == "prompts" and self.predict_skip:
            skip = self.predict_skip
            dataset = dataset.filter(
                lambda rows: [r not in skip for r in rows], input_columns=[ROW], batched=True
            )
            rank_zero_info(
                f"prefl data [{split}]: {len(self.datasets[split]) - len(dataset)} prompt(s) "
                f"already sampled are skipped, {len(dataset)} left"
            )
        by_length = self.mode == "prompts" and self.hparams.predict_by_length
        return self._loader(split, train=False, dataset=dataset, by_length=by_length)
