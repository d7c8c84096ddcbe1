"""Prompt/completion token boundary: completions are tokenized after their prompt (design §3).

A completion's ids are the ids the model sees after the prompt in ``prompt + completion``
tokenized as one text, not the completion tokenized on its own. The two differ for SentencePiece
tokenizers (Llama-2, Mistral-v0.1): on its own, ``" Sure"`` starts with a lone ``"▁"`` token
that the joint text never has. Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen) agree either way.

The rule, per row:

1. Tokenize the prompt on its own and each ``prompt + completion`` as one text, special-token
   text kept as text (:mod:`prefl.data.specials`). Texts are joined as they are (``"...
   Assistant:"`` + ``" Sure"``), except for word-level vocabularies (the toy tokenizer), which
   cannot join words: there a space separates a prompt and completion that have none between
   them (``"was"`` + ``"great"``).
2. Where the prompt's ids are a prefix of every joint tokenization of the row (the usual case:
   HH transcripts, chat templates, a completion that starts at a token boundary), each
   completion is exactly the rest of its joint ids.
3. Where they are not, a token merges across the boundary: a prompt ending in a space
   (``"▁"`` + ``"Sure"`` -> ``"▁Sure"``) or a word cut in two. Then the prompt keeps the
   longest run of its leading ids that every joint tokenization of the row shares, and each
   completion is the rest of its joint ids: every sequence is still exactly its joint
   tokenization, no text is lost or repeated, and a completion (with its loss) starts at the
   merged token, in the prompt's tail. This is TRL's rule of moving the merged last prompt
   token into the answer, extended to a prompt shared by two completions (splitting the joint
   ids at the prompt's own length would drop or repeat the merged text). Such rows are flagged
   ``boundary_merged`` and counted (:func:`count_merged`), never changed silently.

Completions then end with EOS exactly once: appended unless the ids already end in it (a chat
template that writes EOS after the reply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from tokenizers import models

from prefl.data.specials import SpecialTextError, bos_prefix, encode_text


@dataclass
class JointIds:
    """Token ids of a batch of ``N`` rows with ``K`` completions each (``K`` in 0, 1, 2).

    Attributes:
        prompts: ``N`` prompt id lists (``[BOS]`` prefix included for plain rows).
        completions: ``N`` lists of ``K`` completion id lists, each ending with EOS.
        merged: ``N`` flags: the row's boundary merged (rule 3 of the module doc).
    """

    prompts: list[list[int]]
    completions: list[list[list[int]]]
    merged: list[bool]


class RowTextError(ValueError):
    """A :class:`SpecialTextError` located in a batch: ``row`` and ``part`` (``"prompt"`` or the
    completion's position ``0``/``1``)."""

    def __init__(self, row: int, part: str | int, token: str) -> None:
        what = "the prompt" if part == "prompt" else f"completion {part}"
        super().__init__(
            f"{what}: the tokenizer turns the text {token!r} into its special token even with "
            "special tokens split, so it cannot stay text"
        )
        self.row, self.part, self.token = row, part, token


def strip_after_eos(text: str, eos: str) -> str:
    """Drop whitespace that a chat template writes after the final EOS (e.g. a newline)."""
    stripped = text.rstrip()
    return stripped if stripped.endswith(eos) else text


def end_with_eos(ids: list[int], eos_id: int) -> list[int]:
    """``ids`` ending with ``eos_id`` exactly once at the end (appended unless already there)."""
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


def shared_prefix_length(prompt: list[int], joints: list[list[int]]) -> int:
    """Length of the longest run of leading ``prompt`` ids that every one of ``joints`` starts
    with (``len(prompt)`` when the prompt is a prefix of each, the usual case)."""
    n = len(prompt)
    if all(joint[:n] == prompt for joint in joints):  # compared in C
        return n
    for joint in joints:
        k, limit = 0, min(n, len(joint))
        while k < limit and joint[k] == prompt[k]:
            k += 1
        n = k
    return n


def separator(tokenizer: Any) -> str:
    """What joins a prompt and a completion with no whitespace between them: ``" "`` for a
    word-level vocabulary (which cannot join words), else nothing (texts join as they are)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return " " if backend is not None and isinstance(backend.model, models.WordLevel) else ""


def _join(prompt: str, completion: str, sep: str) -> str:
    if sep and prompt[-1:].strip() and completion[:1].strip():
        return prompt + sep + completion
    return prompt + completion


def _encode_located(tokenizer, texts: list[str], chat: bool, where: list[tuple[int, str | int]]):
    try:
        return encode_text(tokenizer, texts, chat)
    except SpecialTextError as err:
        raise RowTextError(*where[err.index], err.token) from err


def encode_rows(
    tokenizer: Any, prompts: list[str], completions: list[list[str]], chat: bool
) -> JointIds:
    """Tokenize ``N`` rows: prompts on their own, completions after their prompt.

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        prompts: ``N`` prompt texts.
        completions: ``N`` lists of ``K`` completion texts (``K`` = 0 in prompts mode).
        chat: Whether the texts were rendered by a chat template (from defused messages, see
            :func:`prefl.data.specials.defuse`); they then carry their own BOS, and whitespace
            after a completion's final EOS is dropped.

    Returns:
        The :class:`JointIds` of the rows, from two batched tokenizer calls.

    Raises:
        RowTextError: A text the tokenizer cannot keep as text, with its row and part.
    """
    eos, eos_id, sep = tokenizer.eos_token, tokenizer.eos_token_id, separator(tokenizer)
    prefix = [] if chat else bos_prefix(tokenizer)
    joints, where = [], []
    for row, (prompt, texts) in enumerate(zip(prompts, completions, strict=True)):
        for part, text in enumerate(texts):
            joint = _join(prompt, text, sep)
            joints.append(strip_after_eos(joint, eos) if chat else joint)
            where.append((row, part))
    prompt_where = [(row, "prompt") for row in range(len(prompts))]
    prompt_ids = _encode_located(tokenizer, prompts, chat, prompt_where)
    joint_ids = iter(_encode_located(tokenizer, joints, chat, where))
    out = JointIds([], [], [])
    for ids, texts in zip(prompt_ids, completions, strict=True):
        row_joints = [next(joint_ids) for _ in texts]
        n = shared_prefix_length(ids, row_joints)  # both sides without the BOS prefix
        out.prompts.append(prefix + ids[:n])
        out.completions.append([end_with_eos(joint[n:], eos_id) for joint in row_joints])
        out.merged.append(n < len(ids))
    return out


def count_merged(split: str, kept: Any, stats: dict[str, dict[str, Any]]) -> Any:
    """Count and log the kept rows flagged ``boundary_merged``; drop that column.

    Args:
        split: The split's name.
        kept: The tokenized split after filtering (a ``datasets.Dataset``), with the
            ``boundary_merged`` column of :func:`prefl.data.tokenize.tokenize_batch`.
        stats: The data module's statistics; ``stats[split]["boundary_merged"]`` is set to the
            count when it is not 0 (and one line is logged).

    Returns:
        ``kept`` without the ``boundary_merged`` column.
    """
    if "boundary_merged" not in kept.column_names:
        return kept
    merged = sum(kept["boundary_merged"])
    if merged:
        stats.setdefault(split, {})["boundary_merged"] = merged
        rank_zero_info(
            f"prefl data [{split}]: {merged} of {len(kept)} rows have a token that merges across "
            "the prompt/completion boundary; their completions start at that token "
            "(prefl.data.boundary, rule 3)"
        )
    return kept.remove_columns(["boundary_merged"])
