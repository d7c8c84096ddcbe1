"""Attention over the units of a packed row, one unit at a time.

A packed row (:mod:`prefl.data.packing`) holds several units end to end. A dense ``(L, L)`` mask
over the row makes attention cost ``L²`` however many units share it, and on a CPU the masked
kernel is slower than the causal one. :func:`segment_attention` computes the same attention unit
by unit, with the causal kernel, so its cost is the sum of each unit's own:

- a unit ``[s, e)`` without a second completion: causal attention within it;
- a prompt-shared unit ``prompt [s, p) | first [p, c) | second [c, e)``: causal attention over
  ``[s, c)``, then the second completion's queries over the prompt's keys and its own (all of the
  prompt, its own causally), never the first completion's.

Spans are ``(s, p, c, e)`` offsets within a row (``p = c = e`` for a run of prompt tokens alone,
such as row padding; ``c = e`` for a unit without a second completion).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: ``(start, prompt_end, first_end, end)`` of one unit, as offsets within its row.
Span = tuple[int, int, int, int]

PROMPT, FIRST, SECOND = 0, 1, 2


def row_spans(segment: torch.Tensor, branch: torch.Tensor) -> list[list[Span]]:
    """The spans of each row's units, from a packed batch's layout tensors.

    Args:
        segment: ``(R, L)`` the unit of each position within its row (units are contiguous).
        branch: ``(R, L)`` 0 prompt, 1 first completion, 2 second completion; within a unit the
            prompt comes first, then the first completion, then the second.

    Raises:
        ValueError: A unit whose branches are out of that order.
    """
    rows: list[list[Span]] = []
    for seg_row, branch_row in zip(segment.tolist(), branch.tolist(), strict=True):
        spans: list[Span] = []
        start = 0
        for end in range(1, len(seg_row) + 1):
            if end < len(seg_row) and seg_row[end] == seg_row[start]:
                continue
            kinds = branch_row[start:end]
            p = start + kinds.count(PROMPT)
            c = p + kinds.count(FIRST)
            if kinds != sorted(kinds):
                raise ValueError(f"unit at {start}:{end} is not laid out prompt, first, second")
            spans.append((start, p, c, end))
            start = end
        rows.append(spans)
    return rows


def _second_mask(prompt: int, second: int, device: torch.device) -> torch.Tensor:
    """``(second, prompt + second)`` bool: every prompt key, and the second's own causally."""
    return torch.ones(second, prompt + second, dtype=torch.bool, device=device).tril(prompt)


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: Sequence[Sequence[Span]],
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention ``(R, H, L, D)`` of packed rows, unit by unit (see the module's docstring).

    Equal to ``scaled_dot_product_attention`` with the layout's dense mask
    (:func:`prefl.models.packed.layout_mask`).

    Args:
        query: ``(R, H, L, D)``.
        key: ``(R, H_kv, L, D)``; ``H`` a multiple of ``H_kv`` (grouped-query attention: each
            key head serves ``H / H_kv`` consecutive query heads).
        value: ``(R, H_kv, L, D)``.
        spans: Per row, its units' spans, covering ``[0, L)`` in order (:func:`row_spans`).
        scale: Softmax scale; None = ``1 / sqrt(D)``.
        dropout_p: Attention dropout probability (0 in evaluation).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    masks: dict[tuple[int, int], torch.Tensor] = {}
    rows = []
    for r, row in enumerate(spans):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        parts = []
        for s, p, c, e in row:
            parts.append(
                F.scaled_dot_product_attention(
                    q[:, :, s:c], k[:, :, s:c], v[:, :, s:c], None, dropout_p, True, scale=scale
                )
            )
            if e > c:
                mask = masks.get((p - s, e - c))
                if mask is None:
                    mask = masks[(p - s, e - c)] = _second_mask(p - s, e - c, query.device)
                keys = torch.cat([k[:, :, s:p], k[:, :, c:e]], dim=2)
                values = torch.cat([v[:, :, s:p], v[:, :, c:e]], dim=2)
                parts.append(
                    F.scaled_dot_product_attention(
                        q[:, :, c:e], keys, values, mask, dropout_p, scale=scale
                    )
                )
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
