r"""Anthropic HH transcripts read as chat messages (``row_format="hh_chat"``).

An HH-RLHF row holds two full transcripts, ``chosen`` and ``rejected``, written as
``"\n\nHuman: …\n\nAssistant: …"``. The ``implicit`` format tunes on that raw text; ``hh_chat``
reads each transcript as one message per turn so that an instruct model is tuned in its own chat
template (the ``conversational`` format renders the messages). Parse rules for one transcript:

- the turn markers are exactly ``"\n\nHuman:"`` and ``"\n\nAssistant:"`` (a ``Human:`` or
  ``Assistant:`` without the blank line before it is text); whitespace before the first
  ``Human:`` is ignored, so a transcript may start with ``"Human:"`` as well;
- each turn is a message, ``Human`` → ``user``, ``Assistant`` → ``assistant``, whose content is
  the text up to the next marker with the whitespace around it stripped;
- the turns start with a user turn, alternate, end with an assistant turn, and none is empty.

A pair parses when both transcripts do and they agree on every turn before their final
assistant turn: then ``prompt`` is those turns, ``chosen`` / ``rejected`` the final assistant
messages (TRL's conversational preference format). Anything else raises :class:`HHParseError`
with a reason from :data:`PARSE_REASONS`; the data module drops such rows and counts them as
``unparsed_transcript`` (by reason, in ``stats[split]["unparsed"]``), or raises a
:class:`~prefl.data.formats.RowError` with ``error_on_drop``. Two assistant turns in a row (a
few real rows) are not merged: that would invent a reply, and strict templates reject them.

Round trip: :func:`render_hh` of the parsed messages is the original transcript with the
whitespace around each turn's content normalised (one space after each marker, none at the end).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import datasets

from prefl.data.formats import Columns, RowError, text_field
from prefl.data.tokenize import SOURCE_ROW, with_source_rows

#: The drop reason of rows whose transcripts do not parse (see the data module's ``stats``).
UNPARSED = "unparsed_transcript"
#: Why a transcript does not parse (:attr:`HHParseError.reason`).
PARSE_REASONS = (
    "no_human_start",
    "not_alternating",
    "no_final_assistant",
    "empty_turn",
    "empty_reply",
    "prompts_differ",
)
ROLES = {"Human": "user", "Assistant": "assistant"}
_MARKER = re.compile(r"\n\n(Human|Assistant):")
_SPEAKERS = {role: name for name, role in ROLES.items()}
_REASON = "__prefl_hh_unparsed__"
_MESSAGES = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]


class HHParseError(ValueError):
    """An HH transcript (or pair) that does not parse.

    Args:
        reason: One of :data:`PARSE_REASONS`.
        detail: What is wrong, in words.
        column: ``"chosen"`` or ``"rejected"`` for a pair; None for a lone transcript.
    """

    def __init__(self, reason: str, detail: str, column: str | None = None) -> None:
        where = f"{column} transcript" if column else "transcript"
        super().__init__(f"{where} does not parse ({reason}): {detail}")
        self.reason, self.detail, self.column = reason, detail, column

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.detail, self.column))


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    r"""Read one ``"\n\nHuman: …\n\nAssistant: …"`` transcript as messages, one per turn.

    Args:
        text: The transcript.

    Returns:
        ``[{"role": "user" | "assistant", "content": str}, ...]``, alternating, from a user
        turn to a (final) assistant turn, contents stripped.

    Raises:
        HHParseError: The text does not follow the parse rules (module doc).
    """
    body = text.lstrip()
    if not body.startswith("Human:"):
        detail = f'it does not start with a "\\n\\nHuman:" turn (starts with {body[:20]!r})'
        raise HHParseError("no_human_start", detail)
    parts = _MARKER.split("\n\n" + body)
    messages = [
        {"role": ROLES[name], "content": content.strip()}
        for name, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"]:
            role = messages[i]["role"]
            raise HHParseError("not_alternating", f"turns {i - 1} and {i} are both {role} turns")
    if messages[-1]["role"] != "assistant":
        raise HHParseError("no_final_assistant", "the last turn is a human turn, not a reply")
    for i, message in enumerate(messages[:-1]):
        if not message["content"]:
            raise HHParseError("empty_turn", f"turn {i} ({message['role']}) is empty")
    if not messages[-1]["content"]:
        raise HHParseError("empty_reply", "the final assistant reply is empty")
    return messages


def parse_hh_pair(chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    """Read an HH pair (two full transcripts) as a conversational preference row.

    Args:
        chosen: The chosen transcript.
        rejected: The rejected transcript.

    Returns:
        ``{"prompt": [...], "chosen": [reply], "rejected": [reply]}``: the turns before the
        final assistant turn, and each transcript's final assistant message.

    Raises:
        HHParseError: A transcript does not parse (``column`` says which), or the two differ
            before their final reply (``prompts_differ``, on ``rejected``).
    """
    conversations = {}
    for column, text in (("chosen", chosen), ("rejected", rejected)):
        try:
            conversations[column] = parse_hh_transcript(text)
        except HHParseError as err:
            raise HHParseError(err.reason, err.detail, column) from None
    prompt, other = conversations["chosen"][:-1], conversations["rejected"][:-1]
    if other != prompt:
        pairs = enumerate(zip(prompt, other, strict=False))
        turn = next((i for i, (a, b) in pairs if a != b), min(len(prompt), len(other)))
        detail = (
            f"chosen and rejected differ before their final reply, from turn {turn} on "
            f"({len(prompt)} and {len(other)} turns before it)"
        )
        raise HHParseError("prompts_differ", detail, "rejected")
    return {
        "prompt": prompt,
        "chosen": conversations["chosen"][-1:],
        "rejected": conversations["rejected"][-1:],
    }


def render_hh(messages: list[Mapping[str, str]]) -> str:
    r"""Write messages back as an HH transcript: ``"\n\nHuman: {content}"`` per user turn,
    ``"\n\nAssistant: {content}"`` per assistant turn (the inverse of
    :func:`parse_hh_transcript`, up to whitespace around each turn's content)."""
    return "".join(f"\n\n{_SPEAKERS[m['role']]}: {m['content']}" for m in messages)


def _parse_row(row: Mapping[str, Any], mode: str, c: Columns, where: tuple[str, int]) -> dict:
    """One raw row as a conversational row for ``mode`` (pairs: both transcripts; sft and
    prompts: the chosen one alone). Non-string or empty fields raise a :class:`RowError`."""
    chosen = text_field(row, c.chosen, where)
    if mode == "pairs":
        parsed = parse_hh_pair(chosen, text_field(row, c.rejected, where))
        columns = {"chosen": c.chosen, "rejected": c.rejected}
        return {c.prompt: parsed["prompt"], **{columns[k]: parsed[k] for k in columns}}
    try:
        messages = parse_hh_transcript(chosen)
    except HHParseError as err:
        raise HHParseError(err.reason, err.detail, "chosen") from None
    return {c.prompt: messages[:-1], c.chosen: messages[-1:]}


def _convert_batch(
    batch: dict[str, list], *, split: str, mode: str, columns: Columns, error_on_drop: bool
) -> dict[str, list]:
    """A batched ``Dataset.map`` function: HH rows to conversational rows, with the reason
    (``""`` if parsed) of each row that does not parse in a ``_REASON`` column."""
    c = columns
    names = {"pairs": [c.prompt, c.chosen, c.rejected], "sft": [c.prompt, c.chosen]}
    out: dict[str, list] = {name: [] for name in names.get(mode, [c.prompt])}
    out[_REASON] = []
    for i, index in enumerate(batch[SOURCE_ROW]):
        row = {key: values[i] for key, values in batch.items()}
        try:
            parsed, reason = _parse_row(row, mode, c, (split, index)), ""
        except HHParseError as err:
            if error_on_drop:
                column = c.rejected if err.column == "rejected" else c.chosen
                problem = f"HH {err} (error_on_drop=True)"
                raise RowError(split, index, column, problem) from err
            parsed, reason = {}, err.reason
        for name in out:
            if name != _REASON:
                out[name].append(parsed.get(name, []))
        out[_REASON].append(reason)
    return out


def hh_to_conversational(
    split: str,
    ds: datasets.Dataset,
    mode: str,
    columns: Columns,
    error_on_drop: bool = False,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, Counter]:
    """Turn an HH split into conversational rows, dropping (and counting) unparsed ones.

    Args:
        split: The split's name, for messages.
        ds: The raw split, with the ``chosen`` (and, for pairs, ``rejected``) transcripts.
        mode: ``pairs`` parses both transcripts; ``sft`` and ``prompts`` the chosen one alone.
        columns: The column names; the message lists are written to ``prompt`` / ``chosen`` /
            ``rejected``, the margin column is kept, other columns are removed.
        error_on_drop: Raise a :class:`RowError` (split, source row, column) at the first
            transcript that does not parse instead of dropping it.
        num_proc: Processes for the ``Dataset.map``.

    Returns:
        The parsed rows (with a :data:`SOURCE_ROW` column naming each one's source row) and
        the number of dropped rows by parse reason.
    """
    ds = with_source_rows(ds)
    kept_columns = [name for name in ds.column_names if name in (columns.margin, SOURCE_ROW)]
    outputs = {"pairs": [columns.prompt, columns.chosen, columns.rejected]}
    outputs["sft"] = outputs["pairs"][:2]
    features = datasets.Features(
        {
            **{name: ds.features[name] for name in kept_columns},
            **{name: _MESSAGES for name in outputs.get(mode, [columns.prompt])},
            _REASON: datasets.Value("string"),
        }
    )
    kwargs = {"split": split, "mode": mode, "columns": columns, "error_on_drop": error_on_drop}
    mapped = ds.map(
        _convert_batch,
        batched=True,
        fn_kwargs=kwargs,
        remove_columns=[name for name in ds.column_names if name not in kept_columns],
        features=features,
        num_proc=num_proc,
        desc=f"prefl: reading HH transcripts of {split}",
    )
    unparsed = Counter(reason for reason in mapped[_REASON] if reason)
    kept = mapped.filter(lambda rs: [not r for r in rs], input_columns=[_REASON], batched=True)
    return kept.remove_columns(_REASON), unparsed
