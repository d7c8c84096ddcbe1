"""Data-parallel sampling that never counts a row twice.

``torch``'s ``DistributedSampler`` pads the index list with repeats so that every rank gets the
same number of rows (ranks must run the same number of steps, or DDP hangs). Those repeats would
be trained on and averaged into the metrics twice. :class:`WeightedDistributedSampler` pads the
same way but marks each repeat (index ``i + len(dataset)``); :class:`MarkedDataset` turns the
mark into ``sample_weight`` 0 (real rows get 1), which the collator passes on as a ``(B,)``
tensor. Losses are then global weighted means (:func:`prefl.functional.global_weighted_mean`)
and metrics weighted means, so the padding changes neither.

:class:`TrainPosition` makes the training data resumable: the data module counts the batches
that reach the model in each epoch and saves the count in checkpoints; a run resumed mid-epoch
skips that many batches of the (seeded, hence identical) order instead of starting the epoch
again.

:func:`group_by_length` (``PreferenceDataModule(group_by_length=True)``) reorders the seeded
shuffle into windows of similar-length rows, so batches carry less padding; ``predict``'s prompts
(``predict_by_length``) are sorted longest first as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

#: Batches (per data-parallel rank) in one length-sorted window of :func:`group_by_length`.
WINDOW_BATCHES = 50


def group_by_length(order: Sequence[int], lengths: Sequence[int], window: int) -> list[int]:
    """Sort each window of ``window`` consecutive indices of ``order`` by length, longest first.

    The windows keep the randomness of ``order`` (which rows share a window, and the windows'
    order); inside one, neighbours have similar lengths, so a batch cut from consecutive indices
    carries little padding. Ties keep their order in ``order`` (stable sort). This is Hugging
    Face's ``group_by_length`` "megabatch" scheme.

    Args:
        order: A permutation of row indices (e.g. an epoch's seeded shuffle).
        lengths: ``lengths[i]`` is row ``i``'s padded cost (its longest sequence in tokens).
        window: Indices per sorted window (``>= 1``).

    Returns:
        The reordered indices: the same multiset as ``order``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = list(order[start : start + window])
        out += sorted(chunk, key=lambda i: -lengths[i])
    return out


def row_lengths(dataset: Any) -> list[int]:
    """Each tokenized row's padded cost in tokens: the prompt plus its longest completion.

    Args:
        dataset: A tokenized split (``prompt_ids`` and ``chosen_ids``/``rejected_ids``,
            ``completion_ids``, or prompts only), as the data module builds it.
    """
    names = ("chosen_ids", "rejected_ids", "completion_ids")
    columns = [c for c in names if c in dataset.column_names]
    prompts = [len(p) for p in dataset["prompt_ids"]]
    longest = [0] * len(prompts)
    for column in columns:
        longest = [max(a, len(b)) for a, b in zip(longest, dataset[column], strict=True)]
    return [p + c for p, c in zip(prompts, longest, strict=True)]


class WeightedDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` (same shuffle, same padding) whose padding indices are marked,
    and which can resume mid-epoch (:meth:`resume_at`). With one replica it is a seeded shuffle
    (``seed + epoch``) without padding: the order of an epoch does not depend on the global RNG,
    so a resumed run sees the same rows as an uninterrupted one.

    Args:
        dataset: The dataset (wrapped in :class:`MarkedDataset` by the data module).
        num_replicas: Data-parallel world size.
        rank: This rank's data-parallel index.
        shuffle: Shuffle (reseeded every epoch by ``set_epoch``, as Lightning does).
        seed: Shuffle seed, equal on every rank.
        lengths: Per-row lengths: if given, the shuffled order is grouped by length
            (:func:`group_by_length`, windows of ``WINDOW_BATCHES`` batches on every rank), so
            each rank's batches, and the ranks' batches of one step, have similar lengths.
            Without ``shuffle`` (``predict``'s prompts) the whole row order is one window: rows
            longest first, ties in row order.
        batch_size: Rows per batch and rank (sets the window size with ``lengths``).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=False)
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(dataset)} rows")
        window = WINDOW_BATCHES * batch_size * num_replicas if shuffle else max(len(dataset), 1)
        self.lengths, self.window = lengths, window
        self.resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, skip: int) -> None:
        """Make the next pass over ``epoch`` start after its first ``skip`` indices (a run
        resumed mid-epoch goes on where it stopped); another epoch is unaffected. ``len`` stays
        the whole epoch's, which is what Lightning's restored batch count expects."""
        self.resume = (epoch, skip)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if self.lengths is not None:  # rank r takes every num_replicas-th index of a window
            order = group_by_length(order, self.lengths, self.window)
        if self.num_replicas > 1:
            order += [n + order[i % n] for i in range(self.total_size - n)]  # marked repeats
        mine = order[self.rank : len(order) : self.num_replicas]
        if self.resume is not None and self.resume[0] == self.epoch:
            mine = mine[self.resume[1] :]
        self.resume = None
        return iter(mine)


def choose_sampler(
    dataset: Any,
    trainer: Any,
    train: bool,
    seed: int,
    lengths: Sequence[int] | None = None,
    batch_size: int = 1,
) -> tuple[WeightedDistributedSampler | None, bool]:
    """The data module's sampler for a split, and whether rows carry ``sample_weight``.

    Under data parallelism: a sampler that marks its padding repeats (weight 0), so an uneven
    last batch is neither dropped nor counted twice. Otherwise training batches come in a
    seeded order per epoch (``seed + epoch``, not the global RNG), so a run resumed mid-epoch
    sees the rows an uninterrupted one would; evaluation is in row order (no sampler), or
    longest first when ``lengths`` are given. With ``Trainer(use_distributed_sampler=False)``
    every rank reads all the rows.

    Args:
        dataset: The tokenized split.
        trainer: The attached Lightning ``Trainer``, or None.
        train: Whether this is the training split (shuffled).
        seed: Shuffle seed.
        lengths: Per-row lengths to group batches by (None = no grouping): windows of a
            training epoch's shuffle, or the whole split for evaluation.
        batch_size: Rows per batch and rank (the grouping window's unit).
    """
    kwargs: dict[str, Any] = {"num_replicas": 1, "rank": 0}
    if (
        trainer is not None
        and trainer.world_size > 1
        and trainer._accelerator_connector.use_distributed_sampler
    ):
        kwargs = dict(trainer.strategy.distributed_sampler_kwargs or kwargs)
    kwargs.update(seed=seed, lengths=lengths, batch_size=batch_size)
    if kwargs["num_replicas"] > 1:
        return WeightedDistributedSampler(dataset, shuffle=train, **kwargs), True
    if train or lengths is not None:
        return WeightedDistributedSampler(dataset, shuffle=train, **kwargs), False
    return None, False


class MarkedDataset(Dataset):
    """Rows of ``dataset`` with ``sample_weight``: 1.0, or 0.0 for a marked repeat (index
    ``i + len(dataset)``, see :class:`WeightedDistributedSampler`).

    Args:
        dataset: A map-style dataset of dict rows.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.dataset)
        row = dict(self.dataset[index % n])
        row["sample_weight"] = 1.0 if index < n else 0.0
        return row


class TrainPosition:
    """Where training is in the data: the epoch and the batches of it that reached the model.

    Batches are counted as they are handed to the model (the data module's
    ``on_before_batch_transfer``), not as the loader yields them: Lightning prefetches a batch
    ahead, and a checkpoint taken after batch ``k`` must resume at batch ``k + 1``.
    """

    def __init__(self) -> None:
        self.epoch, self.batches = 0, 0
        self.pending: tuple[int, int] | None = None

    def advance(self, epoch: int) -> None:
        """One more training batch of ``epoch`` reached the model."""
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: saved in checkpoints by Lightning."""
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next training loader skips ``state["batches"]`` batches of that epoch."""
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.pending = (self.epoch, self.batches)

    def apply(self, sampler: WeightedDistributedSampler, batch_size: int) -> None:
        """Hand a pending resume position to a new training sampler (once)."""
        if self.pending is not None:
            epoch, batches = self.pending
            sampler.resume_at(epoch, batches * batch_size)
            self.pending = None


class ResumableTrainData:
    """Data-module mixin: saves the :class:`TrainPosition` in checkpoints (Lightning stores a
    data module's ``state_dict``) and counts the training batches handed to the model."""

    @property
    def train_position(self) -> TrainPosition:
        """Where training is in the data (created on first use)."""
        if not hasattr(self, "_train_position"):
            self._train_position = TrainPosition()
        return self._train_position

    def state_dict(self) -> dict[str, Any]:
        """``{"train_position": {"epoch", "batches"}}``."""
        return {"train_position": self.train_position.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (a checkpoint from before this existed has none)."""
        if "train_position" in state_dict:
            self.train_position.load_state_dict(state_dict["train_position"])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as it reaches the model (validation batches are not)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.train_position.advance(trainer.current_epoch)
        return batch
