"""Counting what tokenization kept, so that nothing is dropped silently (design §3).

Tokenization gives every row a ``drop_reason`` (``""`` when kept, see
:data:`prefl.data.tokenize.DROP_REASONS`). :func:`keep_and_count` filters the dropped rows out,
records rows read, used, truncated and dropped by reason (for every split,
``read == used + sum(dropped.values())``), logs them as one line, and raises when the split
ends up empty or when ``error_on_drop`` forbids drops.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import datasets
from lightning.pytorch.utilities import rank_zero_info

from prefl.data.tokenize import SOURCE_ROW


def keep_and_count(
    split: str,
    raw: datasets.Dataset,
    mapped: datasets.Dataset,
    stats: dict[str, dict[str, Any]],
    error_on_drop: bool = False,
) -> datasets.Dataset:
    """Drop the rows of ``mapped`` that have a drop reason; count them into ``stats[split]``.

    Args:
        split: The split's name.
        raw: The raw split (its length is rows read; its :data:`SOURCE_ROW` column, when
            present, names dropped rows by their index in the source split).
        mapped: The tokenized split, with ``drop_reason`` and ``truncated`` columns.
        stats: Filled with ``{"read", "used", "truncated", "dropped": {reason: n}}`` for the
            split, before any error is raised.
        error_on_drop: Raise instead of dropping.

    Returns:
        The kept rows, without the ``drop_reason`` and ``truncated`` columns.

    Raises:
        ValueError: Rows would be dropped and ``error_on_drop`` is set, or no row is left.
    """
    reasons = mapped["drop_reason"]
    dropped = Counter(r for r in reasons if r)
    truncated = sum(t for t, r in zip(mapped["truncated"], reasons, strict=True) if not r)
    kept = mapped.filter(
        lambda rs: [not r for r in rs], input_columns=["drop_reason"], batched=True
    ).remove_columns(["drop_reason", "truncated"])
    stats[split] = {
        "read": len(raw),
        "used": len(kept),
        "truncated": truncated,
        "dropped": dict(sorted(dropped.items())),
    }
    drops = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "none"
    rank_zero_info(
        f"prefl data [{split}]: read {len(raw)}, used {len(kept)}, "
        f"truncated {truncated}, dropped {sum(dropped.values())} ({drops})"
    )
    if dropped and error_on_drop:
        first = [i for i, r in enumerate(reasons) if r][:5]
        if SOURCE_ROW in raw.column_names:
            first = [raw[i][SOURCE_ROW] for i in first]
        raise ValueError(
            f"split {split!r}: {sum(dropped.values())} row(s) would be dropped "
            f"({drops}); first rows {first} (error_on_drop=True)"
        )
    if len(kept) == 0:
        raise ValueError(f"split {split!r} is empty after filtering ({drops})")
    return kept
