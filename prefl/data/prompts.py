"""Prompts to sample from: plain texts or chat conversations, tokenized as data rows' prompts are.

Evaluation (:func:`prefl.generation.sample_completions`, :class:`prefl.SampleReport`,
:class:`prefl.EvalCallback`) samples answers to prompts given in code or YAML. A prompt is a
plain text (BOS, then the text as text) or a conversation, a list of ``{"role", "content"}``
messages that the tokenizer's chat template renders with its generation prompt, exactly as a
``conversational`` prompts-mode row is rendered (special-token strings inside the contents stay
text). An instruct model is asked in its own chat format with :func:`as_user_turns`.

A ``prompts``-mode split also carries each prompt as its source gave it
(:func:`add_prompt_sources`): its row id and the prompt itself, a text or a message list, so that
samples written from it (:class:`prefl.SampleWriter`) name their prompt the way the data did.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from prefl.data.collate import PROMPT_SOURCE, ROW
from prefl.data.formats import Columns, RowError, extract_texts
from prefl.data.specials import encode_text, restore
from prefl.data.tokenize import SOURCE_ROW, encode_prompts
from prefl.tasks import toy

#: A prompt: a plain text, or a conversation (messages ending before the reply).
Prompt = str | Sequence[Mapping[str, str]]


def as_user_turns(prompts: Sequence[str]) -> list[list[dict[str, str]]]:
    """Each text as a conversation of one user turn: ``[{"role": "user", "content": text}]``."""
    return [[{"role": "user", "content": text}] for text in prompts]


def resolve_prompts(prompts: str | Sequence[Prompt], chat: bool = False) -> list[Prompt]:
    """The prompts of an evaluation callback.

    Args:
        prompts: ``"toy"`` (the toy task's held-out prompt texts) or a list of prompts (texts or
            conversations).
        chat: Ask each text prompt as one user turn in the chat template (:func:`as_user_turns`),
            as an instruct model is asked; conversations are asked as they are either way.
    """
    out: list[Prompt] = toy.split_prompts()[1] if prompts == "toy" else list(prompts)
    if not chat:
        return out
    return [as_user_turns([p])[0] if isinstance(p, str) else p for p in out]


def _conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]], index: int) -> list:
    """The defused chat text of one conversation (see :mod:`prefl.data.specials`)."""
    where = ("prompts", index)
    if isinstance(messages, str) or not messages:
        raise RowError(*where, "prompt", "expected a text or a non-empty list of messages")
    row = {"prompt": [dict(m) for m in messages]}
    return extract_texts(row, "prompts", "conversational", Columns(), tokenizer, where).prompt


def encode_prompt_list(
    tokenizer: Any, prompts: Sequence[Prompt]
) -> tuple[list[str], list[list[int]]]:
    """Tokenize ``N`` prompts, texts and conversations mixed.

    Args:
        tokenizer: The tokenizer (with a chat template where a prompt is a conversation).
        prompts: ``N`` prompts: texts (BOS, then the text as text) or message lists (rendered
            by the chat template with its generation prompt; the template writes its own BOS).

    Returns:
        ``(texts, ids)``: each prompt as a text (a conversation as its rendered chat text, as
        reward functions see PPO's chat prompts) and its token ids.

    Raises:
        RowError: A prompt that is neither, or a malformed message (split ``"prompts"``, the
            prompt's index, column ``prompt``).
    """
    texts: list[str] = []
    ids: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
            ids.extend(encode_prompts(tokenizer, [prompt]))
            continue
        chat_text = _conversation(tokenizer, prompt, i)
        texts.append(restore(chat_text, tokenizer))
        ids.extend(encode_text(tokenizer, [chat_text], chat=True))
    return texts, ids


def add_prompt_sources(
    tokenized: datasets.Dataset, raw: datasets.Dataset, row_format: str, columns: Columns
) -> datasets.Dataset:
    """Add ``row`` (each row's index in its source split: its id in samples) and
    ``prompt_source`` (each prompt as its source gave it, a text or a message list, JSON-encoded:
    one Arrow type for texts and for messages with any keys; the collator decodes it) to a
    tokenized ``prompts`` split.

    Args:
        tokenized: The tokenized split, one row per row of ``raw`` (before drops are filtered),
            with the extracted ``prompt`` text.
        raw: The raw split it was tokenized from (HH transcripts already read as messages); its
            :data:`~prefl.data.tokenize.SOURCE_ROW` column, when present, gives the row ids,
            else the positions do.
        row_format: The resolved row format: ``conversational`` prompts are the message lists
            (the ``prompt`` column, or a conversation without its final reply); any other
            format's prompt is its text as extracted (an implicit row's common prefix).
        columns: The column names.
    """
    rows = raw[SOURCE_ROW] if SOURCE_ROW in raw.column_names else list(range(len(raw)))
    if row_format != "conversational":
        prompts: list[Any] = tokenized["prompt"]
    elif columns.prompt in raw.column_names:
        prompts = raw[columns.prompt]
    else:  # whole conversations: the turns before the final reply
        column = columns.messages if columns.messages in raw.column_names else columns.chosen
        prompts = [conversation[:-1] for conversation in raw[column]]
    encoded = [json.dumps(prompt, ensure_ascii=False) for prompt in prompts]
    return tokenized.add_column(ROW, rows).add_column(PROMPT_SOURCE, encoded)
