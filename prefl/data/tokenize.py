"""Tokenization of row texts, with explicit truncation and counted drops (design §3).

A tokenized example is prompt ids plus completion ids. Special-token text inside a row stays
text (:mod:`prefl.data.specials`): only prefl (a leading BOS where ``add_special_tokens`` puts
one, the EOS ending each completion) and a chat template place special tokens. Completion ids
are the ids that follow the prompt when ``prompt + completion`` is tokenized as one text
(:mod:`prefl.data.boundary`); a row whose tokens merge across that boundary is flagged in a
``boundary_merged`` column so that it is counted. Completions end with EOS exactly once (it is
appended unless the template wrote it). Prompts are cut from the left to ``max_prompt_length``
(keeping a leading BOS that the tokenizer adds, see :func:`kept_bos`), completions from the
right so that prompt + completion fits ``max_length``. A truncated completion keeps no EOS: it
did not end.

Rows are never dropped here: each gets a ``drop_reason`` (``""`` when kept) so that the data
module can count reasons before it filters. Reasons: ``identical`` (chosen == rejected text),
``identical_after_truncation``, ``prompt_too_long`` (no room left for a completion) and
``empty_completion`` (an implicit reply that is only whitespace, as in a few Anthropic HH rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets

from prefl.data.boundary import RowTextError, encode_rows
from prefl.data.formats import Columns, RowError, extract_texts, sft_column
from prefl.data.specials import bos_prefix, encode_text, restore

DROP_REASONS = ("identical", "identical_after_truncation", "prompt_too_long", "empty_completion")
#: Column holding each row's index in its source split, added by the data module when it
#: reorders rows (validation carve, ``subset``) so that errors still name the source row.
SOURCE_ROW = "__prefl_source_row__"


@dataclass(frozen=True)
class Limits:
    """Length limits in tokens.

    Args:
        max_length: Most tokens of prompt + completion.
        max_prompt_length: Most prompt tokens (cut from the left); None = no own limit.
    """

    max_length: int
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")


def with_source_rows(ds: datasets.Dataset) -> datasets.Dataset:
    """``ds`` with each row's index in a :data:`SOURCE_ROW` column, kept through shuffles."""
    if SOURCE_ROW in ds.column_names:
        return ds
    return ds.add_column(SOURCE_ROW, list(range(len(ds))))


def encode_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Tokenize ``N`` plain prompt texts as data rows' prompts are: the BOS that
    ``add_special_tokens`` would put first, then the text as text (special-token strings in it
    stay text; see :func:`prefl.data.specials.encode_text`). For prompts that are sampled from
    (evaluation); rows with completions go through :func:`prefl.data.boundary.encode_rows`."""
    return [bos_prefix(tokenizer) + ids for ids in encode_text(tokenizer, texts, chat=False)]


def truncate_prompt(
    ids: list[int], limit: int | None, bos_id: int | None
) -> tuple[list[int], bool]:
    """Cut ``ids`` from the left to ``limit`` tokens, keeping a leading BOS; returns (ids, cut)."""
    if limit is None or len(ids) <= limit:
        return ids, False
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:
        return [bos_id, *ids[len(ids) - limit + 1 :]], True
    return ids[len(ids) - limit :], True


def kept_bos(tokenizer: Any) -> int | None:
    """The BOS id that a left cut keeps at a prompt's front, or None.

    Only a tokenizer that puts a BOS before every text (``add_special_tokens``) has one to keep: a
    model was trained to see it first. Where BOS is only a token of the chat template (SmolLM2's
    BOS is ``<|im_start|>``, which opens every turn), keeping it would leave a turn marker in
    front of a text cut mid-turn, so a cut is a plain left cut.
    """
    prefix = bos_prefix(tokenizer)
    return prefix[0] if prefix and prefix[0] == tokenizer.bos_token_id else None


def fit_completion(prompt_len: int, ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """Cut ``ids`` from the right so that prompt + completion <= ``max_length``."""
    room = max_length - prompt_len
    return (ids, False) if len(ids) <= room else (ids[: max(room, 0)], True)


def tokenize_row(
    prompt_ids: list[int],
    completions: list[list[int]],
    limits: Limits,
    bos_id: int | None,
) -> dict[str, Any]:
    """Apply the truncation rules to one row and decide whether it is kept.

    Args:
        prompt_ids: Prompt token ids.
        completions: Zero (prompts mode), one (sft) or two (pairs: chosen, rejected) completions.
        limits: The length limits.
        bos_id: The tokenizer's BOS id, kept when a prompt is cut from the left.

    Returns:
        ``prompt_ids``, ``completions`` (truncated), ``truncated`` (bool) and ``drop_reason``.
    """
    prompt_ids, cut = truncate_prompt(prompt_ids, limits.max_prompt_length, bos_id)
    reason = ""
    if completions and len(prompt_ids) >= limits.max_length:
        reason = "prompt_too_long"
    fitted = [fit_completion(len(prompt_ids), ids, limits.max_length) for ids in completions]
    truncated = cut or any(c for _, c in fitted)
    out = [ids for ids, _ in fitted]
    if not reason and len(out) == 2 and out[0] == out[1]:
        reason = "identical_after_truncation"
    return {
        "prompt_ids": prompt_ids,
        "completions": out,
        "truncated": truncated,
        "drop_reason": reason,
    }


def _margin(row: dict[str, Any], column: str, where: tuple[str, int]) -> float:
    value = row.get(column)
    finite = isinstance(value, int | float) and abs(value) < float("inf")  # False for NaN, inf
    if isinstance(value, bool) or not finite:
        raise RowError(*where, column, f"expected a finite number, got {value!r}")
    return float(value)


def _label(row: dict[str, Any], column: str, where: tuple[str, int]) -> bool:
    value = row.get(column)
    if not isinstance(value, bool):
        raise RowError(*where, column, f"expected true or false (desirable?), got {value!r}")
    return value


def _text_column(part: str | int, mode: str, row_format: str, c: Columns, row: dict) -> str:
    """The column that a row's prompt (``part="prompt"``) or completion ``part`` came from."""
    if part == 1:
        return c.rejected
    if part == 0:
        return c.chosen if mode == "pairs" else sft_column(row, c)
    if row_format == "explicit" or c.prompt in row:
        return c.prompt
    return c.messages if c.messages in row else c.chosen


def tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    split: str,
    mode: str,
    row_format: str,
    columns: Columns,
    tokenizer: Any,
    limits: Limits,
    use_margin: bool,
    use_label: bool = False,
) -> dict[str, list]:
    """Tokenize a batch of raw rows (the function given to a batched ``Dataset.map``).

    Returns columns ``prompt_ids``, ``truncated``, ``drop_reason``, ``boundary_merged`` (the
    row's prompt/completion boundary merged, see :mod:`prefl.data.boundary`); plus
    ``chosen_ids`` and ``rejected_ids`` (pairs), ``completion_ids`` (sft) or ``prompt`` text
    (prompts); plus ``margin`` when ``use_margin``, and the boolean ``label`` of unpaired rows
    when ``use_label``. Raises :class:`RowError` naming split, row and column; the row is
    ``indices`` (positions in the split), or the :data:`SOURCE_ROW` column when present.
    """
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    if SOURCE_ROW in batch:  # name rows by their index in the source split, not after a shuffle
        indices = [row.pop(SOURCE_ROW) for row in rows]
    texts = [
        extract_texts(row, mode, row_format, columns, tokenizer, (split, index))
        for row, index in zip(rows, indices, strict=True)
    ]
    chat = row_format == "conversational"
    n_completions = {"pairs": 2, "sft": 1, "prompts": 0}[mode]
    completion_texts = [[t.chosen, t.rejected][:n_completions] for t in texts]
    try:
        encoded = encode_rows(tokenizer, [t.prompt for t in texts], completion_texts, chat)
    except RowTextError as err:
        column = _text_column(err.part, mode, row_format, columns, rows[err.row])
        raise RowError(split, indices[err.row], column, str(err)) from err
    out: dict[str, list] = {"prompt_ids": [], "truncated": [], "drop_reason": []}
    bos_id = kept_bos(tokenizer)
    names = {"pairs": ["chosen_ids", "rejected_ids"], "sft": ["completion_ids"], "prompts": []}
    for name in names[mode]:
        out[name] = []
    for i, t in enumerate(texts):
        prompt, completions = encoded.prompts[i], encoded.completions[i]
        result = tokenize_row(prompt, completions, limits, bos_id)
        if mode == "pairs" and t.chosen == t.rejected:
            result["drop_reason"] = "identical"
        elif any(not text.strip() for text in completion_texts[i]):
            result["drop_reason"] = "empty_completion"
        out["prompt_ids"].append(result["prompt_ids"])
        out["truncated"].append(result["truncated"])
        out["drop_reason"].append(result["drop_reason"])
        for name, ids in zip(names[mode], result["completions"], strict=True):
            out[name].append(ids)
    out["boundary_merged"] = encoded.merged
    if mode == "prompts":
        out["prompt"] = [restore(t.prompt, tokenizer) if chat else t.prompt for t in texts]
    where = [(split, index) for index in indices]
    if use_margin:
        out["margin"] = [_margin(r, columns.margin, w) for r, w in zip(rows, where, strict=True)]
    if use_label:
        out["label"] = [_label(r, columns.label, w) for r, w in zip(rows, where, strict=True)]
    return out
