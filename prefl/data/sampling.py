"""Data-parallel sampling that never counts a row twice.

``torch``'s ``DistributedSampler`` pads the index list with repeats so that every rank gets the
same number of rows (ranks must run the same number of steps, or DDP hangs). Those repeats would
be trained on and averaged into the metrics twice. :class:`WeightedDistributedSampler` pads the
same way but marks each repeat (index ``i + len(dataset)``); :class:`MarkedDataset` turns the
mark into ``sample_weight`` 0 (real rows get 1), which the collator passes on as a ``(B,)``
tensor. Losses are then global weighted means (:func:`prefl.functional.global_weighted_mean`)
and metrics weighted means, so the padding changes neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler


class WeightedDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` (same shuffle, same padding) whose padding indices are marked.

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

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        order += [n + order[i % n] for i in range(self.total_size - n)]  # marked repeats
        return iter(order[self.rank : self.total_size : self.num_replicas])


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
