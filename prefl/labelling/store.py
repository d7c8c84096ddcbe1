"""The labelling page's decisions on disk: a journal that loses nothing, and the pairs file.

The items are the comparisons a person is asked about (:func:`plan_items`): for each prompt,
pairs of its completions, two at a time; with ``scores`` in the samples the closest-scored pair
first (the most informative), without them in index order; and in rounds, so that every prompt
gets its first comparison before any gets its second. Each item is shown in a random
left/right order, fixed per item by the seed and recorded with its decision.

Every decision (left, right, tie, skip) and every undo is a line of the *journal*
(``PAIRS.jsonl.journal``), appended and ``fsync``-ed before the call returns, so before the
page shows the next item. The pairs file (``PAIRS.jsonl``, what ``PreferenceDataModule(mode=
"pairs")`` reads) holds the left/right decisions that stand: a decision is appended to it, an
undo rewrites it from the journal (written to a temporary file, ``fsync``-ed, renamed), and so
does every start. A server killed at any moment restarts at the first undecided item: a journal
line cut short by the kill was never confirmed, and is dropped (and said). One process at a
time writes a journal (an exclusive ``flock``); within it a lock serialises the requests of
several tabs, and a decision on an item already decided is refused, not written twice.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefl.data.pairs import SampleRow, comparisons, pair_row
from prefl.data.validate import DataFileError

try:  # POSIX; elsewhere only the in-process lock guards the journal
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)
DECISIONS = ("left", "right", "tie", "skip")


@dataclass(frozen=True)
class Item:
    """One comparison: completions ``left`` and ``right`` of sample row ``row``, as shown."""

    id: str
    row: int
    left: int
    right: int


def plan_items(
    rows: Sequence[SampleRow], seed: int = 0, per_prompt: int | None = None
) -> list[Item]:
    """The items to ask about, in order (module doc).

    Args:
        rows: The sample rows.
        seed: Seed of the left/right order (each item's order depends on it and the item id).
        per_prompt: Most comparisons per prompt; None = every pair of different completions.
    """
    per_row = []
    for row in rows:
        pairs = comparisons(row.completions)
        if row.scores is not None:
            pairs.sort(key=lambda p, s=row.scores: abs(s[p[0]] - s[p[1]]))
        per_row.append(pairs[:per_prompt] if per_prompt is not None else pairs)
    items = []
    for turn in range(max((len(p) for p in per_row), default=0)):
        for r, pairs in enumerate(per_row):
            if turn < len(pairs):
                i, j = pairs[turn]
                item_id = rows[r].comparison_id(i, j)
                if random.Random(f"{seed}:{item_id}").random() < 0.5:
                    i, j = j, i
                items.append(Item(item_id, r, i, j))
    return items


def _fsync_append(f: Any, record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


class LabelStore:
    """The decisions on the items of ``rows``, kept in ``out`` and its journal (module doc).

    Args:
        rows: The sample rows.
        out: The pairs file; its journal is ``out`` + ``.journal``.
        seed: Seed of the left/right order.
        per_prompt: Most comparisons per prompt; None = all.

    Raises:
        ValueError: Another process holds the journal.
        DataFileError: A journal line (not the last) that does not parse, or names an item
            that the samples do not have.
    """

    def __init__(
        self,
        rows: Sequence[SampleRow],
        out: str | Path,
        seed: int = 0,
        per_prompt: int | None = None,
    ) -> None:
        self.rows, self.out = list(rows), Path(out)
        self.items = plan_items(self.rows, seed, per_prompt)
        self.by_id = {item.id: item for item in self.items}
        self.journal_path = Path(f"{self.out}.journal")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._journal = self.journal_path.open("a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(self._journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._journal.close()
                raise ValueError(
                    f"another prefl label is writing {self.out} (its journal "
                    f"{self.journal_path} is locked)"
                ) from None
        self.decided: dict[str, dict[str, Any]] = {}  # item id -> record, in decision order
        self._replay()
        self._rewrite_pairs()

    def _replay(self) -> None:
        self._journal.seek(0)
        lines = self._journal.read().split("\n")
        complete, partial = lines[:-1], lines[-1]
        for number, text in enumerate(complete, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataFileError(self.journal_path, number, f"invalid JSON: {err.msg}") from None
            self._apply(record, number)
        if partial:  # cut short by a kill mid-write: never confirmed to the page
            log.warning("prefl label: dropping an unfinished last journal line: %r", partial)
            size = os.fstat(self._journal.fileno()).st_size
            self._journal.truncate(size - len(partial.encode("utf-8")))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        self._journal.seek(0, os.SEEK_END)

    def _apply(self, record: dict[str, Any], number: int) -> None:
        item_id = record.get("undo", record.get("id"))
        if item_id not in self.by_id:
            raise DataFileError(
                self.journal_path,
                number,
                f"item {item_id!r} is not among the samples' items (other samples, or other "
                "--per-prompt, than the run that wrote this journal?)",
            )
        if "undo" in record:
            self.decided.pop(item_id, None)
        else:
            self.decided[item_id] = record

    def pair_of(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The pairs-file row of a left/right decision (None for a tie or a skip)."""
        if record["decision"] not in ("left", "right"):
            return None
        item = self.by_id[record["id"]]
        row = self.rows[item.row]
        win, lose = (item.left, item.right)[:: 1 if record["decision"] == "left" else -1]
        return pair_row(
            row.prompt,
            row.completions[win],
            row.completions[lose],
            0.0,
            "human",
            id=item.id,
            left=item.left,
            right=item.right,
            chosen_side=record["decision"],
        )

    def _rewrite_pairs(self) -> None:
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in self.decided.values():
                row = self.pair_of(record)
                if row is not None:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself, on disk
            fd = os.open(self.out.parent, os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def next_item(self) -> Item | None:
        """The first undecided item, or None when all are decided."""
        return next((item for item in self.items if item.id not in self.decided), None)

    def decide(self, item_id: str, decision: str) -> bool:
        """Record ``decision`` (left, right, tie or skip) on ``item_id``, on disk before it
        returns; False (nothing written) when the item is already decided.

        Raises:
            KeyError: An unknown item.
            ValueError: An unknown decision.
        """
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r}: expected one of {list(DECISIONS)}")
        with self._lock:
            if item_id not in self.by_id:
                raise KeyError(item_id)
            if item_id in self.decided:
                return False
            item = self.by_id[item_id]
            record = {"id": item_id, "decision": decision, "left": item.left}
            record.update(right=item.right, time=round(time.time(), 3))
            _fsync_append(self._journal, record)
            self.decided[item_id] = record
            row = self.pair_of(record)
            if row is not None:
                with self.out.open("a", encoding="utf-8") as f:
                    _fsync_append(f, row)
            return True

    def undo(self) -> str | None:
        """Take back the latest standing decision (on disk before it returns); its item id, or
        None when there is none."""
        with self._lock:
            if not self.decided:
                return None
            item_id, record = next(reversed(self.decided.items()))
            _fsync_append(self._journal, {"undo": item_id, "time": round(time.time(), 3)})
            del self.decided[item_id]
            if record["decision"] in ("left", "right"):
                self._rewrite_pairs()
            return item_id

    def tally(self) -> dict[str, int]:
        """Items in all, decided, and decisions by kind (``left`` and ``right`` are pairs)."""
        kinds = {d: 0 for d in DECISIONS}
        for record in self.decided.values():
            kinds[record["decision"]] += 1
        return {"total": len(self.items), "decided": len(self.decided), **kinds}

    def close(self) -> None:
        """Release the journal (and its lock)."""
        self._journal.close()
