"""Prompts to sample from: plain texts or chat conversations, tokenized as data rows' prompts are.

Evaluation (:func:`prefl.generation.sample_completions`, :class:`prefl.SampleReport`,
:class:`prefl.EvalCallback`) samples answers to prompts given in code or YAML. A prompt is a
plain text (BOS, then the text as text) or a conversation, a list of ``{"role", "content"}``
messages that the tokenizer's chat template renders with its generation prompt, exactly as a
``conversational`` prompts-mode row is rendered (special-token strings inside the contents stay
text). An instruct model is asked in its own chat format with :func:`as_user_turns`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefl.data.formats import Columns, RowError, extract_texts
from prefl.data.specials import encode_text, restore
from prefl.data.tokenize import encode_prompts
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
