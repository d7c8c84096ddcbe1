"""Collators: pad tokenized examples into the documented batch layout.

Batch keys (keep them stable, every module reads them):

- ``pairs``: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask``,
  ``rejected_input_ids``, ``rejected_attention_mask``, ``rejected_loss_mask``, all ``(B, T)`` and
  right-padded to one common ``T`` so chosen and rejected can be stacked on the batch dimension
  for a single forward; plus ``margin`` ``(B,)`` when the dataset has one, and
  ``ref_chosen_logps`` / ``ref_rejected_logps`` ``(B,)`` once precomputed.
- ``sft``: ``input_ids``, ``attention_mask``, ``loss_mask``, ``(B, T)``, right-padded.
- ``unpaired`` (KTO): the ``sft`` keys, ``kl_input_ids``, ``kl_attention_mask``,
  ``kl_loss_mask`` (each row's prompt with its mismatched completion, see
  :mod:`prefl.data.unpaired`), all right-padded to one common length, and ``label`` ``(B,)``
  bool (True = desirable); ``ref_logps`` / ``ref_kl_logps`` ``(B,)`` once precomputed.
- ``prompts``: ``prompt_input_ids``, ``prompt_attention_mask`` ``(B, P)``, left-padded for
  generation; plus ``prompt`` (the prompt texts, a list of ``B`` strings) for reward functions;
  plus, from a data module's split, ``row`` ``(B,)`` long (each prompt's row id in its source
  split) and ``prompt_source`` (each prompt as the source gave it: a text or a message list).

Masks are 1 on real tokens (attention) or on completion tokens (loss) and 0 elsewhere; padding
uses the tokenizer's PAD id (which may be EOS: the masks tell them apart).

With ``packing`` or ``share_prompt``, ``pairs`` and ``sft`` batches have the padding-free layout of
:mod:`prefl.data.packing` instead (keys :data:`~prefl.data.packing.PACKED_KEYS`, plus the same
per-row passthrough columns).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from prefl.data.packing import first_fit, lay_out, packed_units

#: Per-row columns of a data module's ``prompts`` split (added by
#: :func:`prefl.data.prompts.add_prompt_sources`): the row id, and the prompt as its source gave
#: it (JSON-encoded).
ROW, PROMPT_SOURCE = "row", "prompt_source"

#: Per-row float columns passed through as ``(B,)`` tensors when the dataset has them: the
#: margin, reference log-probs precomputed by ``DPOModule(precompute_ref_logps=True)``, and the
#: data-parallel ``sample_weight`` (0 = a padding repeat, see :mod:`prefl.data.sampling`).
PASSTHROUGH = (
    "margin",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_logps",
    "ref_kl_logps",
    "sample_weight",
)


def padded_length(lengths: Sequence[int], multiple: int | None) -> int:
    """Longest length, rounded up to a multiple of ``multiple`` (unchanged if already one)."""
    longest = max(lengths)
    if multiple:
        longest = -(-longest // multiple) * multiple
    return longest


def pad(seqs: Sequence[Sequence[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    """Stack ``seqs`` into a ``(len(seqs), length)`` long tensor filled with ``value``."""
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            if left:
                out[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            else:
                out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


class PreferenceCollator:
    """Turn a list of tokenized examples into a padded batch for one data-module ``mode``.

    Args:
        pad_token_id: The PAD id (it may equal EOS).
        mode: ``pairs``, ``sft`` or ``prompts``.
        pad_to_multiple_of: Round the padded length up to this multiple (e.g. 8 for tensor
            cores); a length that is already a multiple is kept.
        packing: Lay the batch's sequences (or shared pairs) end to end in rows of at most
            ``row_length`` tokens (``pairs`` and ``sft``; see :mod:`prefl.data.packing`).
        share_prompt: Lay each pair out once as ``prompt | chosen | rejected`` (``pairs``).
        row_length: Most tokens of a packed row; a longer unit gets a row of its own. None =
            the whole batch in one row.
    """

    def __init__(
        self,
        pad_token_id: int,
        mode: str,
        pad_to_multiple_of: int | None = None,
        packing: bool = False,
        share_prompt: bool = False,
        row_length: int | None = None,
    ):
        if mode not in ("pairs", "sft", "prompts", "unpaired"):
            raise ValueError(f"unknown mode {mode!r}; expected pairs, sft, prompts or unpaired")
        if packing and mode == "prompts":
            raise ValueError("packing: prompts are left-padded for generation, not packed")
        if packing and mode == "unpaired":
            raise ValueError("packing: unpaired (KTO) batches are not packed yet")
        if share_prompt and mode != "pairs":
            raise ValueError(f"share_prompt: only pairs share a prompt, not mode {mode!r}")
        if packing and row_length is not None and row_length < 2:
            raise ValueError(f"packing_length must be >= 2 (or None: one row), got {row_length}")
        self.pad_token_id, self.mode, self.multiple = pad_token_id, mode, pad_to_multiple_of
        self.packing, self.share_prompt, self.row_length = packing, share_prompt, row_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``examples`` (rows of the tokenized dataset) into a batch."""
        if self.mode == "prompts":
            batch = self._prompts(examples)
        elif self.packing or self.share_prompt:
            batch = self._packed(examples)
        elif self.mode == "sft":
            batch = self._sequences(examples, "completion_ids", "")
        elif self.mode == "unpaired":
            batch = self._unpaired(examples)
        else:
            batch = self._pairs(examples)
        for key in PASSTHROUGH:
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch

    def _packed(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        units = packed_units(examples, self.mode, self.share_prompt)
        lengths = [len(u.tokens) for u in units]
        if self.packing:
            rows = first_fit(lengths, self.row_length)
        else:  # shared pairs, one per row
            rows = [[i] for i in range(len(units))]
        length = padded_length([sum(lengths[i] for i in row) for row in rows], self.multiple)
        batch = lay_out(units, self.pad_token_id, rows, length)
        if self.mode == "pairs":  # chosen i is sequence i, rejected i is sequence B + i
            n = len(examples)
            batch["pair_sequences"] = torch.stack([torch.arange(n), torch.arange(n, 2 * n)], 1)
        return batch

    def _pairs(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        names = ("chosen", "rejected")
        full = [[e["prompt_ids"] + e[f"{n}_ids"] for e in examples] for n in names]
        length = padded_length([len(s) for seqs in full for s in seqs], self.multiple)
        batch: dict[str, Any] = {}
        for name in names:
            batch.update(self._sequences(examples, f"{name}_ids", f"{name}_", length))
        return batch

    def _unpaired(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [e["prompt_ids"] + e["completion_ids"] for e in examples]
        kl_rows = [e["prompt_ids"] + e["kl_completion_ids"] for e in examples]
        length = padded_length([len(r) for r in rows + kl_rows], self.multiple)
        batch = self._sequences(examples, "completion_ids", "", length)
        batch.update(self._sequences(examples, "kl_completion_ids", "kl_", length))
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        return batch

    def _sequences(self, examples, key: str, prefix: str, length: int | None = None) -> dict:
        prompts = [e["prompt_ids"] for e in examples]
        completions = [e[key] for e in examples]
        seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
        length = length or padded_length([len(s) for s in seqs], self.multiple)
        real = [[1] * len(s) for s in seqs]
        loss = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions, strict=True)]
        return {
            f"{prefix}input_ids": pad(seqs, self.pad_token_id, length),
            f"{prefix}attention_mask": pad(real, 0, length),
            f"{prefix}loss_mask": pad(loss, 0, length),
        }

    def _prompts(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [e["prompt_ids"] for e in examples]
        length = padded_length([len(p) for p in prompts], self.multiple)
        batch = {
            "prompt_input_ids": pad(prompts, self.pad_token_id, length, left=True),
            "prompt_attention_mask": pad([[1] * len(p) for p in prompts], 0, length, left=True),
            "prompt": [e["prompt"] for e in examples],
        }
        if ROW in examples[0]:
            batch[ROW] = torch.tensor([e[ROW] for e in examples], dtype=torch.long)
        if PROMPT_SOURCE in examples[0]:
            batch[PROMPT_SOURCE] = [json.loads(e[PROMPT_SOURCE]) for e in examples]
        return batch
