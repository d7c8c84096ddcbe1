"""Counting what tokenization kept, so that nothing is dropped silently (design §3).

Tokenization gives every row a ``drop_reason`` (``""`` when kept, see
:data:`prefl.data.tokenize.DROP_REASONS`). :func:`keep_and_count` filters the dropped rows out,
records rows read, used, truncated and dropped by reason (for every split,
``read == used + sum(dropped.values())``), logs them as one line, and raises when the split
ends up empty or when ``error_on_drop`` forbids drops. Rows dropped before tokenization, whose
HH transcripts did not parse (``row_format="hh_chat"``, :mod:`prefl.data.hh`), are counted as
``unparsed_transcript``, by parse reason in ``stats[split]["unparsed"]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import datasets
from lightning.pytorch.utilities import rank_zero_info

from prefl.data.hh import UNPARSED
from prefl.data.tokenize import SOURCE_ROW


def keep_and_count(
    split: str,
    raw: datasets.Dataset,
    mapped: datasets.Dataset,
    stats: dict[str, dict[str, Any]],
    error_on_drop: bool = False,
    unparsed: Mapping[str, int] | None = None,
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
        unparsed: Rows dropped before tokenization because their HH transcripts did not parse,
            by parse reason (``raw`` holds the rows that did); None = not an ``hh_chat`` split.

    Returns:
        The kept rows, without the ``drop_reason`` and ``truncated`` columns.

    Raises:
        ValueError: Rows would be dropped and ``error_on_drop`` is set, or no row is left.
    """
    if len(mapped):
        reasons = mapped["drop_reason"]
        truncated = sum(t for t, r in zip(mapped["truncated"], reasons, strict=True) if not r)
        kept = mapped.filter(
            lambda rs: [not r for r in rs], input_columns=["drop_reason"], batched=True
        ).remove_columns(["drop_reason", "truncated"])
    else:  # no row reached tokenization (none of an hh_chat split's transcripts parsed)
        reasons, truncated, kept = [], 0, mapped
    dropped = Counter(r for r in reasons if r)
    read = len(raw) + sum((unparsed or {}).values())
    if unparsed:
        dropped[UNPARSED] = sum(unparsed.values())
    stats[split] = {
        "read": read,
        "used": len(kept),
        "truncated": truncated,
        "dropped": dict(sorted(dropped.items())),
    }
    if unparsed is not None:
        stats[split]["unparsed"] = dict(sorted(unparsed.items()))
    drops = _drops_text(dropped, unparsed)
    rank_zero_info(
        f"prefl data [{split}]: read {read}, used {len(kept)}, "
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


def _drops_text(dropped: Counter, unparsed: Mapping[str, int] | None) -> str:
    """``"identical=2, unparsed_transcript=3 [empty_reply=1, not_alternating=2]"``."""
    parts = []
    for reason, n in sorted(dropped.items()):
        why = ", ".join(f"{k}={v}" for k, v in sorted((unparsed or {}).items()))
        parts.append(f"{reason}={n} [{why}]" if reason == UNPARSED else f"{reason}={n}")
    return ", ".join(parts) or "none"
