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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler


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
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=False)

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
        if self.num_replicas > 1:
            order += [n + order[i % n] for i in range(self.total_size - n)]  # marked repeats
        mine = order[self.rank : len(order) : self.num_replicas]
        if self.resume is not None and self.resume[0] == self.epoch:
            mine = mine[self.resume[1] :]
        self.resume = None
        return iter(mine)


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
