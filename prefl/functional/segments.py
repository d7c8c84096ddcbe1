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
#: Whether ``scaled_dot_product_attention`` takes grouped-query heads as they are (torch >= 2.5,
#: ``enable_gqa``); used on a CPU, whose kernel then skips repeating the keys and values.
_GQA_KERNEL = torch.__version__ >= (2, 5)


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


def _pieces(row: Sequence[Span]) -> tuple[list[int], list[int]]:
    """The query and key/value piece lengths of a row's units, in row order: a unit without a
    second completion is one piece of each; a prompt-shared unit is two query pieces (prompt and
    first completion, second completion) and three key/value pieces (prompt, first, second)."""
    queries: list[int] = []
    keys: list[int] = []
    for s, p, c, e in row:
        queries += [c - s, e - c] if e > c else [c - s]
        keys += [p - s, c - p, e - c] if e > c else [c - s]
    return queries, keys


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
    (:func:`prefl.models.packed.layout_mask`). The rows are cut into pieces with ``split`` (whose
    backward joins the pieces' gradients in one copy, where slicing would zero-fill and add a
    full-length gradient per slice); on a CPU, grouped-query heads go to the kernel as they are
    (``enable_gqa``), not repeated.

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
    gqa = groups > 1 and query.device.type == "cpu" and _GQA_KERNEL
    if groups > 1 and not gqa:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    masks: dict[tuple[int, int], torch.Tensor] = {}
    rows = []
    for q, k, v, row in zip(query.split(1), key.split(1), value.split(1), spans, strict=True):
        q_sizes, kv_sizes = _pieces(row)
        qs = iter(q.split(q_sizes, 2))
        ks, vs = iter(k.split(kv_sizes, 2)), iter(v.split(kv_sizes, 2))
        parts = []
        for s, p, c, e in row:
            if e == c:
                parts.append(_attend(next(qs), next(ks), next(vs), None, dropout_p, scale, gqa))
                continue
            prompt_k, first_k, second_k = next(ks), next(ks), next(ks)
            prompt_v, first_v, second_v = next(vs), next(vs), next(vs)
            keys, values = torch.cat([prompt_k, first_k], 2), torch.cat([prompt_v, first_v], 2)
            parts.append(_attend(next(qs), keys, values, None, dropout_p, scale, gqa))
            mask = masks.get((p - s, e - c))
            if mask is None:
                mask = masks[(p - s, e - c)] = _second_mask(p - s, e - c, query.device)
            keys, values = torch.cat([prompt_k, second_k], 2), torch.cat([prompt_v, second_v], 2)
            parts.append(_attend(next(qs), keys, values, mask, dropout_p, scale, gqa))
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None,
    gqa: bool,
) -> torch.Tensor:
    """One piece's attention: causal without ``mask``, else under the ``(Lq, Lk)`` bool mask."""
    grouped = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(
        query, key, value, mask, dropout_p, mask is None, scale=scale, **grouped
    )
