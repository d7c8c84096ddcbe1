r"""Row formats: turn one raw dataset row into text (prompt, completions), whatever its shape.

Three formats are accepted (design §3), detected from the columns or named by the user:

- ``explicit``: ``prompt`` plus ``chosen``/``rejected`` (pairs) or ``completion``/``chosen``
  (SFT) strings.
- ``implicit``: ``chosen``/``rejected`` full texts whose common prefix is the prompt. For
  Anthropic HH-style transcripts the prompt ends at the last ``"\\n\\nAssistant:"`` marker inside
  the longest common prefix, so a reply that itself contains the marker is still split right.
- ``conversational``: message lists ``[{"role", "content"}]`` rendered with the tokenizer's chat
  template: either ``prompt`` + completion message lists, full ``chosen``/``rejected``
  conversations sharing all but their last (assistant) turn, or a ``messages`` column (SFT).
  Special-token strings inside message contents are *defused* before rendering (replaced by
  private markers, :func:`prefl.data.specials.defuse`) so that tokenization keeps them as text
  while the template's own special tokens stay special; ``specials.restore`` undoes it.

A fourth, ``hh_chat``, is only ever named (never detected): HH transcripts that the data module
turns into ``conversational`` rows before they reach :func:`extract_texts`
(:mod:`prefl.data.hh`).

Every problem raises :class:`RowError`, whose message names the split, row index and column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefl.data.specials import defuse

FORMATS = ("explicit", "implicit", "conversational")
ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class RowError(ValueError):
    """A dataset row that cannot be used, with where it is (split, row, column)."""

    def __init__(self, split: str, index: int, column: str, problem: str) -> None:
        super().__init__(f"split {split!r}, row {index}, column {column!r}: {problem}")
        self.split, self.index, self.column, self.problem = split, index, column, problem

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its four fields, so that it crosses process boundaries (``num_proc``).
        return (type(self), (self.split, self.index, self.column, self.problem))


@dataclass(frozen=True)
class Columns:
    """Column names of a preference dataset (remappable to the dataset's own names)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    messages: str = "messages"
    margin: str = "margin"
    label: str = "label"


@dataclass
class RowTexts:
    """The texts of one row: the prompt and up to two completions, ready for tokenization.

    ``chat`` tells that the texts were rendered by a chat template (so they already hold the
    template's special tokens, BOS included where the template writes it) from defused
    messages: a special-token string that a message's content held is a marker in them
    (:func:`prefl.data.specials.restore` gives the plain text).
    """

    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    chat: bool = False


def required_columns(mode: str, row_format: str, columns: Columns, names: list[str]) -> list[str]:
    """Return the columns that ``mode`` and ``row_format`` need, given the dataset's ``names``."""
    c = columns
    if row_format == "implicit" or (row_format == "hh_chat" and mode == "pairs"):
        return [c.chosen, c.rejected]
    if row_format == "hh_chat":  # sft and prompts read the chosen transcript alone
        return [c.chosen]
    if mode == "pairs":
        pair = [c.chosen, c.rejected]
        return [c.prompt, *pair] if row_format == "explicit" or c.prompt in names else pair
    if mode == "sft":
        if row_format == "conversational" and c.messages in names:
            return [c.messages]
        second = c.completion if c.completion in names else c.chosen
        return [c.prompt, second]
    if row_format == "conversational" and c.prompt not in names:
        return [c.messages] if c.messages in names else [c.chosen]
    return [c.prompt]


def detect_format(row: Mapping[str, Any], columns: Columns) -> str:
    """Guess the row format from one row.

    Lists of messages mean ``conversational`` (a list of anything but mappings, e.g. of
    strings, does not: it is a wrong type in a text column, reported as such); a prompt column
    means ``explicit``; ``chosen``/``rejected`` alone mean ``implicit``.
    """
    keys = (columns.prompt, columns.chosen, columns.rejected, columns.completion, columns.messages)
    if any(_is_message_list(row.get(k)) for k in keys):
        return "conversational"
    if columns.prompt in row:
        return "explicit"
    if columns.chosen in row and columns.rejected in row:
        return "implicit"
    raise ValueError(
        f"cannot detect the row format: expected columns {columns.prompt!r} + completions, "
        f"{columns.chosen!r}/{columns.rejected!r}, or message lists; found {sorted(row)}"
    )


def _is_message_list(value: Any) -> bool:
    """A list that is empty or holds at least one mapping (a message)."""
    return isinstance(value, list) and (not value or any(isinstance(v, Mapping) for v in value))


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def text_field(row: Mapping[str, Any], column: str, where: tuple[str, int]) -> str:
    """``row[column]``, which must be a non-empty string; else a :class:`RowError` at
    ``where`` (``(split, row index)``)."""
    value = row.get(column)
    if not isinstance(value, str):
        raise RowError(*where, column, f"expected a non-empty string, got {_kind(value)}")
    if not value.strip():
        raise RowError(*where, column, "expected a non-empty string, got an empty one")
    return value


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    r"""Split two full texts into (prompt, chosen reply, rejected reply).

    The prompt is the longest common prefix cut back to the end of its last assistant turn
    marker (HH style): the first ``"\n\nAssistant:"`` after the last ``"\n\nHuman:"``, so a
    marker that both replies happen to contain is not taken for a turn. Texts without the
    marker fall back to the longest common prefix cut back to a whitespace boundary. Returns
    None when there is no common prompt.
    """
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    human = common.rfind(HUMAN_MARKER)
    end = common.find(ASSISTANT_MARKER, human) if human >= 0 else -1
    if end < 0:  # no human turn, or the texts diverge inside one: take the last assistant turn
        end = common.rfind(ASSISTANT_MARKER)
    if end >= 0:
        end += len(ASSISTANT_MARKER)
    elif ASSISTANT_MARKER not in chosen:
        end = max(common.rfind(" "), common.rfind("\n"))
    if end <= 0 or not common[:end].strip():
        return None
    return chosen[:end], chosen[end:], rejected[end:]


def _messages(row: Mapping[str, Any], column: str, where: tuple[str, int]) -> list[dict]:
    value = row.get(column)
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _kind(value)
        problem = f"expected a non-empty list of {{role, content}} messages, got {got}"
        raise RowError(*where, column, problem)
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or not {"role", "content"} <= set(msg):
            raise RowError(*where, column, f"message {i} is not a {{role, content}} mapping")
        if msg["role"] not in CHAT_ROLES:
            raise RowError(
                *where,
                column,
                f"message {i} has unknown role {msg['role']!r}; "
                f"expected one of {sorted(CHAT_ROLES)}",
            )
        if not isinstance(msg["content"], str):
            problem = f"message {i} content is not a string (got {_kind(msg['content'])})"
            raise RowError(*where, column, problem)
    return list(value)


def _defused(messages: list[dict], tokenizer: Any, column: str, where: tuple[str, int]) -> list:
    """``messages`` with special-token strings in their contents replaced by markers."""
    out = []
    for i, msg in enumerate(messages):
        try:
            out.append({**msg, "content": defuse(msg["content"], tokenizer)})
        except ValueError as err:
            raise RowError(*where, column, f"message {i} content: {err}") from err
    return out


def _last_assistant(messages: list[dict], column: str, where: tuple[str, int]) -> None:
    if messages[-1]["role"] != "assistant":
        raise RowError(*where, column, "the conversation does not end with an assistant turn")
    if not messages[-1]["content"].strip():
        raise RowError(*where, column, "the last assistant turn is empty")


def _reply_text(
    tokenizer: Any,
    prompt: list[dict],
    prompt_text: str,
    reply: list[dict],
    where: tuple[str, int],
    column: str,
) -> str:
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not full.startswith(prompt_text):
        raise RowError(*where, column, "the chat template does not render the prompt as a prefix")
    return full[len(prompt_text) :]


def _conversational(row, mode: str, c: Columns, tokenizer, where) -> RowTexts:
    names = {"pairs": [c.chosen, c.rejected], "sft": [sft_column(row, c)], "prompts": []}[mode]

    def messages(column: str) -> list[dict]:
        return _defused(_messages(row, column, where), tokenizer, column, where)

    if c.prompt in row:  # a prompt column: its value must be a message list, even if None
        prompt = messages(c.prompt)
        replies = [messages(name) for name in names]
    else:
        conv_names = names or [c.messages if c.messages in row else c.chosen]
        convs = [messages(name) for name in conv_names]
        for conv, name in zip(convs, conv_names, strict=True):
            _last_assistant(conv, name, where)
        prompt = convs[0][:-1]
        if any(conv[:-1] != prompt for conv in convs[1:]):
            raise RowError(*where, conv_names[1], "the conversations differ before their last turn")
        if not prompt:
            raise RowError(*where, conv_names[0], "no prompt: the conversation has a single turn")
        replies = [conv[-1:] for conv in convs] if names else []
    for reply, name in zip(replies, names, strict=True):
        _last_assistant(reply, name, where)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    completions = [
        _reply_text(tokenizer, prompt, prompt_text, reply, where, name)
        for reply, name in zip(replies, names, strict=True)
    ]
    return RowTexts(prompt_text, *completions, chat=True)


def sft_column(row: Mapping[str, Any], c: Columns) -> str:
    """The column holding an SFT row's completion: ``completion``, ``messages`` or ``chosen``."""
    for name in (c.completion, c.messages, c.chosen):
        if name in row:
            return name
    return c.completion


def extract_texts(
    row: Mapping[str, Any],
    mode: str,
    row_format: str,
    columns: Columns,
    tokenizer: Any,
    where: tuple[str, int],
) -> RowTexts:
    """Turn one raw row into :class:`RowTexts` for ``mode`` (``pairs``, ``sft``, ``prompts``).

    Args:
        row: The raw row.
        mode: ``pairs`` needs two completions, ``sft`` one, ``prompts`` none.
        row_format: One of :data:`FORMATS`.
        columns: The column names.
        tokenizer: Renders conversational rows with its chat template.
        where: ``(split, row index)`` for error messages.

    Raises:
        RowError: An empty, ``None`` or non-string field, an unknown role, a malformed
            conversation, or an implicit pair with no common prompt.
    """
    c = columns
    if row_format == "conversational":
        return _conversational(row, mode, c, tokenizer, where)
    if row_format == "implicit":
        if mode == "sft" and c.rejected not in row:
            problem = "implicit SFT rows need a rejected text to find the prompt"
            raise RowError(*where, c.rejected, problem)
        chosen, rejected = text_field(row, c.chosen, where), text_field(row, c.rejected, where)
        parts = split_implicit(chosen, rejected)
        if parts is None:
            raise RowError(*where, c.chosen, "chosen and rejected share no prompt (common prefix)")
        return RowTexts(*parts)
    prompt = text_field(row, c.prompt, where)
    if mode == "prompts":
        return RowTexts(prompt=prompt)
    if mode == "sft":
        return RowTexts(prompt=prompt, chosen=text_field(row, sft_column(row, c), where))
    return RowTexts(prompt, text_field(row, c.chosen, where), text_field(row, c.rejected, where))
