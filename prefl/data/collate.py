"""Collators: pad tokenized examples into the documented batch layout.

Batch keys (keep them stable, every module reads them):

- ``pairs``: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask``,
  ``rejected_input_ids``, ``rejected_attention_mask``, ``rejected_loss_mask``, all ``(B, T)`` and
  right-padded to one common ``T`` so chosen and rejected can be stacked on the batch dimension
  for a single forward; plus ``margin`` ``(B,)`` when the dataset has one, and
  ``ref_chosen_logps`` / ``ref_rejected_logps`` ``(B,)`` once precomputed.
- ``sft``: ``input_ids``, ``attention_mask``, ``loss_mask``, ``(B, T)``, right-padded.
- ``prompts``: ``prompt_input_ids``, ``prompt_attention_mask`` ``(B, P)``, left-padded for
  generation; plus ``prompt`` (the prompt texts, a list of ``B`` strings) for reward functions.

Masks are 1 on real tokens (attention) or on completion tokens (loss) and 0 elsewhere; padding
uses the tokenizer's PAD id, which is never EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: Per-row float columns passed through as ``(B,)`` tensors when the dataset has them: the
#: margin, reference log-probs precomputed by ``DPOModule(precompute_ref_logps=True)``, and the
#: data-parallel ``sample_weight`` (0 = a padding repeat, see :mod:`prefl.data.sampling`).
PASSTHROUGH = ("margin", "ref_chosen_logps", "ref_rejected_logps", "sample_weight")


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
        pad_token_id: The PAD id (distinct from EOS).
        mode: ``pairs``, ``sft`` or ``prompts``.
        pad_to_multiple_of: Round the padded length up to this multiple (e.g. 8 for tensor
            cores); a length that is already a multiple is kept.
    """

    def __init__(self, pad_token_id: int, mode: str, pad_to_multiple_of: int | None = None):
        if mode not in ("pairs", "sft", "prompts"):
            raise ValueError(f"unknown mode {mode!r}; expected pairs, sft or prompts")
        self.pad_token_id, self.mode, self.multiple = pad_token_id, mode, pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``examples`` (rows of the tokenized dataset) into a batch."""
        if self.mode == "prompts":
            batch = self._prompts(examples)
        elif self.mode == "sft":
            batch = self._sequences(examples, "completion_ids", "")
        else:
            batch = self._pairs(examples)
        for key in PASSTHROUGH:
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch

    def _pairs(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        names = ("chosen", "rejected")
        full = [[e["prompt_ids"] + e[f"{n}_ids"] for e in examples] for n in names]
        length = padded_length([len(s) for seqs in full for s in seqs], self.multiple)
        batch: dict[str, Any] = {}
        for name in names:
            batch.update(self._sequences(examples, f"{name}_ids", f"{name}_", length))
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
        return {
            "prompt_input_ids": pad(prompts, self.pad_token_id, length, left=True),
            "prompt_attention_mask": pad([[1] * len(p) for p in prompts], 0, length, left=True),
            "prompt": [e["prompt"] for e in examples],
        }
