"""Preference pairs from sampled completions: read the samples, choose the pairs, write the rows.

A *samples* file (JSON Lines, as :class:`prefl.SampleWriter` writes it) holds one row per
prompt: ``{"prompt": <a text or a list of {role, content} messages>, "completions": [k
strings], "meta": {"row": <its id>, "model": ..., ...}}``, optionally with ``scores`` (one number
per completion, as ``prefl pairs --scores-out`` writes them: the labelling page then asks about
the closest-scored pair first).
:func:`read_samples` reads one or more such files with every problem named by file and 1-based
line (:class:`~prefl.data.validate.DataFileError`); rows that cannot give a pair are counted
in a :class:`LabelCounts` by reason, never dropped silently.

:func:`choose_pairs` turns one row's labels into pairs: *best against worst* by default, or
*every pair whose margin is at least* ``min_margin``. A labeller is either a score per
completion (a reward model, a reward function) or a pairwise verdict (a judge, see
:mod:`prefl.data.judging`); equal scores, an undecided verdict and two identical texts are
ties. :func:`pair_row` writes a pair in the prompt's own format, so that
``PreferenceDataModule(mode="pairs")`` reads the file as it is: a text prompt gives text
``chosen``/``rejected``, a conversation gives one-message assistant turns.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefl.data.formats import CHAT_ROLES
from prefl.data.validate import DataFileError

#: A prompt as a samples row holds it: a text, or a conversation ending before the reply.
Prompt = str | list[dict[str, str]]
#: Margin of completion ``i`` over completion ``j`` (> 0: ``i`` is better, < 0: ``j`` is), or
#: None when the labeller could not decide (a tie).
Verdict = Callable[[int, int], float | None]
#: The reasons a samples row is skipped, in the order the summary names them.
SKIP_REASONS = ("no completions", "one completion", "fewer than two non-blank completions")


@dataclass(frozen=True)
class SampleRow:
    """One prompt of a samples file and its completions.

    Attributes:
        path: The file it was read from.
        line: Its 1-based line in that file.
        key: Its id as text: the row's ``id``, else its ``meta["row"]`` (the prompt's row in
            its source split, as :class:`prefl.SampleWriter` writes it), else
            ``"<file name>:<line>"``.
        prompt: A text, or a list of ``{role, content}`` messages.
        completions: Its non-blank completions (blank ones are left out and counted).
        scores: One number per completion when the row carries ``scores``, else None.
        meta: The row's ``meta`` (the sampling model, settings, seed), or empty.
        indices: Each completion's position in the row's own list (blank ones left out), by
            which pair ids name completions.
    """

    path: str
    line: int
    key: str
    prompt: Prompt
    completions: list[str]
    scores: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    indices: list[int] = field(default_factory=list)

    @property
    def chat(self) -> bool:
        """Whether the prompt is a conversation (a list of messages)."""
        return not isinstance(self.prompt, str)

    def comparison_id(self, i: int, j: int) -> str:
        """The id of comparing completions ``i`` and ``j`` of this row (positions in
        :attr:`completions`): ``"<key>/<a>-<b>"``, ``a < b`` their positions in the row as
        written."""
        a, b = sorted((self.indices[i], self.indices[j]))
        return f"{self.key}/{a}-{b}"


@dataclass
class LabelCounts:
    """What labelling did with its input: every row read is used or skipped with a reason.

    Attributes:
        prompts: Sample rows read.
        pairs: Pairs written.
        ties: Comparisons that came out even (equal scores, a judge whose two orders disagree,
            identical texts, a person's "tie").
        below_margin: Decided comparisons whose margin was under ``--min-margin``.
        blank: Blank completions left out of rows that still had two others.
        skipped: Rows skipped, by reason (:data:`SKIP_REASONS`).
    """

    prompts: int = 0
    pairs: int = 0
    ties: int = 0
    below_margin: int = 0
    blank: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skipped_text(self) -> str:
        """``"<n> rows skipped"``, with the count of each reason in brackets when there are."""
        reasons = ", ".join(f"{n} {r}" for r in SKIP_REASONS if (n := self.skipped.get(r)))
        text = f"{sum(self.skipped.values())} rows skipped"
        return text + (f" ({reasons})" if reasons else "")

    def line(self, what: str = "prefl pairs") -> str:
        """The one-line summary: prompts read, pairs written, ties, rows skipped by reason."""
        text = (
            f"{what}: {self.prompts} prompts read, {self.pairs} pairs written, "
            f"{self.ties} ties, {self.skipped_text()}"
        )
        if self.below_margin:
            text += f", {self.below_margin} pairs below --min-margin"
        if self.blank:
            text += f", {self.blank} blank completions left out"
        return text


def sample_files(source: str | Path) -> list[Path]:
    """The samples files of ``source``: the file itself, or a folder's ``*.jsonl`` files (as
    :class:`prefl.SampleWriter` writes them), sorted by name."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".jsonl"))
        if not files:
            raise FileNotFoundError(f"samples folder {str(path)!r} holds no *.jsonl file")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"samples file {str(path)!r} does not exist")
    return [path]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _prompt(value: Any, where: tuple[str, int]) -> Prompt:
    """A row's ``prompt``: a non-empty text, or a non-empty list of messages."""
    if isinstance(value, str) and value.strip():
        return value
    if not isinstance(value, list) or not value:
        raise DataFileError(*where, f"'prompt': expected a text or messages, got {_kind(value)}")
    for i, msg in enumerate(value):
        ok = isinstance(msg, Mapping) and isinstance(msg.get("content"), str)
        if not ok or msg.get("role") not in CHAT_ROLES:
            raise DataFileError(
                *where,
                f"'prompt' message {i}: expected {{role, content}} with a role in "
                f"{sorted(CHAT_ROLES)} and a text content",
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _numbers(value: Any, n: int, where: tuple[str, int]) -> list[float] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == n
    if not ok or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise DataFileError(*where, f"'scores': expected {n} numbers (one per completion)")
    return [float(v) for v in value]


def parse_sample(text: str, where: tuple[str, int], counts: LabelCounts) -> SampleRow | None:
    """One samples line as a :class:`SampleRow`, or None when it is skipped (counted).

    Args:
        text: The line.
        where: ``(file, 1-based line)`` for errors.
        counts: Receives a skip reason, or the blank completions left out.

    Raises:
        DataFileError: Invalid JSON, not an object, or a missing or mistyped field.
    """
    try:
        row = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        raise DataFileError(*where, f"invalid JSON at column {err.colno}: {err.msg}") from None
    if not isinstance(row, dict):
        raise DataFileError(*where, f"expected a JSON object (one row per line), got {_kind(row)}")
    for key in ("prompt", "completions"):
        if key not in row:
            raise DataFileError(*where, f"no {key!r} (a samples row holds prompt, completions)")
    prompt, completions = _prompt(row["prompt"], where), row["completions"]
    if not isinstance(completions, list) or any(not isinstance(c, str) for c in completions):
        raise DataFileError(*where, "'completions': expected a list of texts")
    scores = _numbers(row.get("scores"), len(completions), where)
    kept = [i for i, c in enumerate(completions) if c.strip()]
    if len(kept) < 2:
        reason = SKIP_REASONS[min(len(completions), 2)]
        counts.skipped[reason] += 1
        return None
    counts.blank += len(completions) - len(kept)
    meta = row["meta"] if isinstance(row.get("meta"), dict) else {}
    key = row.get("id", meta.get("row"))
    key = f"{Path(where[0]).name}:{where[1]}" if key is None else str(key)
    return SampleRow(
        path=where[0],
        line=where[1],
        key=key,
        prompt=prompt,
        completions=[completions[i] for i in kept],
        scores=None if scores is None else [scores[i] for i in kept],
        meta=meta,
        indices=kept,
    )


def read_samples(sources: Iterable[str | Path], counts: LabelCounts) -> list[SampleRow]:
    """Every usable row of the samples files (or folders) ``sources``, in order.

    Rows read are counted in ``counts.prompts``, skipped ones by reason. All rows must share
    one kind of prompt (texts, or conversations): a file of pairs holds one format.

    Raises:
        DataFileError: A line that is not a samples row, or a prompt of the other kind, named
            by file and line.
    """
    rows: list[SampleRow] = []
    first: SampleRow | None = None
    for path in [p for source in sources for p in sample_files(source)]:
        with path.open(encoding="utf-8") as f:
            for number, text in enumerate(f, 1):
                if not text.strip():
                    continue
                counts.prompts += 1
                row = parse_sample(text, (str(path), number), counts)
                if row is None:
                    continue
                first = first or row
                if row.chat != first.chat:
                    kinds = ("a text prompt", "a conversation")
                    raise DataFileError(
                        path,
                        number,
                        f"{kinds[row.chat]}, but {Path(first.path).name} line {first.line} "
                        f"holds {kinds[first.chat]}: one file of pairs holds one kind",
                    )
                rows.append(row)
    return rows


def comparisons(completions: Sequence[str]) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, of completions with different texts."""
    n = len(completions)
    return [(i, j) for i in range(n) for j in range(i + 1, n) if completions[i] != completions[j]]


def choose_pairs(
    completions: Sequence[str],
    scores: Sequence[float],
    counts: LabelCounts,
    verdict: Verdict | None = None,
    min_margin: float | None = None,
) -> list[tuple[int, int, float]]:
    """The pairs ``(chosen, rejected, margin)`` of one row's completions (indices).

    Args:
        completions: The row's completions (identical texts are never paired: a tie).
        scores: One score per completion; ranks them for best against worst.
        counts: Receives ties and pairs under ``min_margin``.
        verdict: Margin of ``i`` over ``j`` (None: undecided); None = the score difference.
        min_margin: None = best against worst (one pair at most: the first best and the first
            worst by score, kept when its verdict favours the best); a number = every pair
            of different texts whose margin is at least this.

    Returns:
        The pairs, each with its margin (> 0, the chosen one's over the rejected one's).
    """

    def margin(i: int, j: int) -> float | None:
        if completions[i] == completions[j]:
            return None
        return scores[i] - scores[j] if verdict is None else verdict(i, j)

    if min_margin is None:
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        m = margin(best, worst) if scores[best] != scores[worst] else None
        if m is None or m <= 0:
            counts.ties += 1
            return []
        return [(best, worst, m)]
    out = []
    n = len(completions)
    for i, j in [(a, b) for a in range(n) for b in range(a + 1, n)]:
        m = margin(i, j)
        if not m:
            counts.ties += 1
        elif abs(m) < min_margin:
            counts.below_margin += 1
        else:
            out.append((i, j, m) if m > 0 else (j, i, -m))
    return out


def pair_row(
    prompt: Prompt, chosen: str, rejected: str, margin: float, source: str, **extra: Any
) -> dict[str, Any]:
    """A pair as ``PreferenceDataModule(mode="pairs")`` reads it: ``prompt``, ``chosen``,
    ``rejected`` in the prompt's format (texts; or, for a conversation, one assistant message
    each), ``margin``, ``source`` (who labelled it), then ``extra`` fields."""
    if not isinstance(prompt, str):
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {**row, "margin": float(margin), "source": source, **extra}
