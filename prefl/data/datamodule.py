"""PreferenceDataModule: one LightningDataModule for every stage (SFT, reward, DPO, PPO).

It loads a source through ``datasets.load_dataset`` (hub id, local file or folder; an in-memory
``Dataset``/``DatasetDict``; or ``"toy"``, the embedded toy task), picks or carves the splits
(:mod:`prefl.data.sources`), turns each row into text (:mod:`prefl.data.formats`), tokenizes
with a batched, cached ``Dataset.map`` (:mod:`prefl.data.tokenize`) and pads batches
(:mod:`prefl.data.collate`).

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
from typing import Any, Literal

import datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from prefl.data.collate import ROW, PreferenceCollator
from prefl.data.formats import Columns
from prefl.data.sampling import (
    MarkedDataset,
    ResumableTrainData,
    WeightedDistributedSampler,
    choose_sampler,
    row_lengths,
)
from prefl.data.sources import SplitRecipe, carve_splits, load_source, prepare_split, source_name
from prefl.data.tokenize import Limits
from prefl.data.tokenizers import load_tokenizer
from prefl.data.validate import undecodable

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
                f"dataset {source_name(self.dataset)} has no {h.train_split!r} split (found "
                f"{sorted(raw)}); name the training split with train_split="
            )
        recipe = SplitRecipe(
            self.mode,
            self.row_format,
            self.columns,
            self.tokenizer,
            self.limits,
            h.error_on_drop,
            h.num_proc,
            source_name(self.dataset),
        )
        for split in wanted:
            if split in raw and split not in self.datasets:
                try:
                    self.datasets[split] = prepare_split(split, raw[split], recipe, self.stats)
                except UnicodeDecodeError as err:
                    raise undecodable(self.dataset, split, err) from err

    def load_raw(self) -> datasets.DatasetDict:
        """Load the source as a ``DatasetDict`` (:func:`prefl.data.sources.load_source`)."""
        h = self.hparams
        return load_source(
            self.dataset, self.mode, h.train_split, h.seed, h.name, h.data_dir, h.cache_dir
        )

    def splits(self) -> dict[str, datasets.Dataset]:
        """The raw splits after the validation carve, ``subset`` and ``max_samples``."""
        h = self.hparams
        return carve_splits(
            self.load_raw(),
            h.train_split,
            h.val_split,
            h.val_fraction,
            h.subset,
            h.max_samples,
            h.seed,
        )

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
