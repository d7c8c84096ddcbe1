"""Padding-free layouts of a batch: sequences packed end to end, and prompt sharing.

A padded ``pairs`` batch lays each of its ``2B`` sequences (``prompt + chosen``, ``prompt +
rejected``) on a row of its own, right-padded to the longest; on real preference data most of
those positions are padding, and every prompt is there twice. Two layouts remove that waste
without changing which rows form the batch (the collator lays out what the sampler chose):

- **packing**: the batch's *units* are laid end to end, all in one row, or in rows of at most
  ``row_length`` tokens (first fit, longest unit first); each unit's positions restart at 0, and
  attention never crosses a unit boundary.
- **prompt sharing** (``pairs``): a unit is ``prompt | chosen | rejected``, the prompt once. The
  rejected tokens attend to the prompt and to themselves, never to the chosen tokens, and their
  positions continue from the prompt's end as if the chosen tokens were not there, so they see
  exactly what they see in ``prompt + rejected``. Without packing each unit is a row of its own.

Without sharing a unit is one sequence (``prompt + completion``). The batch (:data:`PACKED_KEYS`,
every tensor on the flattened ``R x L`` positions of its rows) tells each consumer what it needs
without knowing the layout: the log-prob of sequence ``s`` is the sum, over the targets ``n``
with ``target_sequence[n] == s``, of ``log p(target_ids[n])`` under the logits at flat position
``target_index[n]`` (the position whose next token it is: for a rejected completion's first
token, the prompt's last position); a reward model reads sequence ``s`` at ``last_index[s]``.
Sequences are numbered as the padded path stacks them: for ``pairs``, chosen ``0..B-1`` then
rejected ``B..2B-1`` (a ``pairs`` batch also holds ``pair_sequences`` ``(B, 2)``, the chosen and
rejected sequence of each pair); for ``sft``, ``0..B-1``. Attention is given by ``segment`` (the
unit of each position within its row; row padding is a segment of its own, so that no position
attends to nothing) and ``branch`` (0 prompt, 1 chosen or the SFT completion, 2 rejected):
position ``q`` sees ``k <= q`` of the same segment whose branch is 0 or ``q``'s own
(:func:`prefl.models.packed.packed_model_inputs` turns that into the model's mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prefl.functional.segments import FIRST, PROMPT, SECOND

#: The keys of a packed batch (besides the per-row passthrough columns such as ``margin``).
PACKED_KEYS = (
    "packed_input_ids",
    "packed_position_ids",
    "packed_segment",
    "packed_branch",
    "target_index",
    "target_ids",
    "target_sequence",
    "last_index",
)
__all__ = ["FIRST", "PACKED_KEYS", "PROMPT", "SECOND", "Unit", "lay_out", "packed_units"]


@dataclass
class Unit:
    """One unit of a packed row: its tokens with their positions and branches, the targets it
    holds (``(offset of the predicting position, token id, sequence)``) and the last token of
    each of its sequences (``(sequence, offset)``)."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branch: list[int] = field(default_factory=list)
    targets: list[tuple[int, int, int]] = field(default_factory=list)
    lasts: list[tuple[int, int]] = field(default_factory=list)

    def add(self, ids: Sequence[int], start: int, branch: int, source: int, seq: int) -> None:
        """Append completion ``ids`` at positions ``start...``, its first token predicted at
        offset ``source`` (-1: none, the sequence starts with it), the rest by their
        predecessor; record the sequence's last token (``source`` when ``ids`` is empty)."""
        offset = len(self.tokens)
        for j, token in enumerate(ids):
            predictor = source if j == 0 else offset + j - 1
            if predictor >= 0:
                self.targets.append((predictor, token, seq))
        self.tokens += ids
        self.positions += range(start, start + len(ids))
        self.branch += [branch] * len(ids)
        self.lasts.append((seq, offset + len(ids) - 1 if ids else source))


def sequence_unit(prompt: Sequence[int], completion: Sequence[int], seq: int) -> Unit:
    """``prompt + completion`` as one sequence ``seq`` (its completion tokens are its targets)."""
    unit = Unit(list(prompt), list(range(len(prompt))), [PROMPT] * len(prompt))
    unit.add(completion, len(prompt), FIRST, len(prompt) - 1, seq)
    return unit


def shared_unit(
    prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], seqs: tuple[int, int]
) -> Unit:
    """``prompt | chosen | rejected``: both completions continue the prompt (positions from
    ``len(prompt)``, first tokens predicted at the prompt's last position)."""
    unit = sequence_unit(prompt, chosen, seqs[0])
    unit.add(rejected, len(prompt), SECOND, len(prompt) - 1, seqs[1])
    return unit


def first_fit(lengths: Sequence[int], capacity: int | None) -> list[list[int]]:
    """Unit indices per row: longest first, each into the first row with room (a unit longer
    than ``capacity`` gets a row of its own); rows keep their units in that order. ``capacity``
    None: one row holds every unit."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if capacity is None:
        return [order] if order else []
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def lay_out(
    units: list[Unit], pad_token_id: int, rows: list[list[int]], length: int
) -> dict[str, torch.Tensor]:
    """The tensors of :data:`PACKED_KEYS` for ``units`` placed as ``rows`` (unit indices per row)
    on rows of ``length`` tokens."""
    n_rows = len(rows)
    ids = torch.full((n_rows, length), pad_token_id, dtype=torch.long)
    positions = torch.zeros((n_rows, length), dtype=torch.long)
    segment = torch.zeros((n_rows, length), dtype=torch.long)
    branch = torch.zeros((n_rows, length), dtype=torch.long)
    targets: list[tuple[int, int, int]] = []
    lasts: dict[int, int] = {}
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members):
            unit, end = units[i], at + len(units[i].tokens)
            ids[r, at:end] = torch.tensor(unit.tokens, dtype=torch.long)
            positions[r, at:end] = torch.tensor(unit.positions, dtype=torch.long)
            branch[r, at:end] = torch.tensor(unit.branch, dtype=torch.long)
            segment[r, at:end] = k
            base = r * length + at
            targets += [(base + source, token, seq) for source, token, seq in unit.targets]
            lasts.update({seq: base + offset for seq, offset in unit.lasts})
            at = end
        positions[r, at:] = torch.arange(length - at)  # padding: a sequence of its own
        segment[r, at:] = len(members)
    index, token, seq = zip(*targets, strict=True) if targets else ((), (), ())
    return {
        "packed_input_ids": ids,
        "packed_position_ids": positions,
        "packed_segment": segment,
        "packed_branch": branch,
        "target_index": torch.tensor(index, dtype=torch.long),
        "target_ids": torch.tensor(token, dtype=torch.long),
        "target_sequence": torch.tensor(seq, dtype=torch.long),
        "last_index": torch.tensor([lasts[s] for s in range(len(lasts))], dtype=torch.long),
    }


def packed_units(examples: list[dict[str, Any]], mode: str, share_prompt: bool) -> list[Unit]:
    """The units of a batch of tokenized examples: one per sequence, or (``share_prompt``) one
    per pair; sequences numbered as the padded path stacks them."""
    n = len(examples)
    if mode == "sft":
        return [
            sequence_unit(e["prompt_ids"], e["completion_ids"], i) for i, e in enumerate(examples)
        ]
    if share_prompt:
        return [
            shared_unit(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], (i, n + i))
            for i, e in enumerate(examples)
        ]
    chosen = [sequence_unit(e["prompt_ids"], e["chosen_ids"], i) for i, e in enumerate(examples)]
    rejected = [
        sequence_unit(e["prompt_ids"], e["rejected_ids"], n + i) for i, e in enumerate(examples)
    ]
    return chosen + rejected


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` has a packed layout (:data:`PACKED_KEYS`) rather than padded rows."""
    return "packed_input_ids" in batch
