"""Model inputs for the padding-free layouts of :mod:`prefl.data.packing`.

A packed row holds several units (sequences, or shared pairs); what keeps them apart is the
attention mask and the position ids, which the batch carries as ``packed_segment``,
``packed_branch`` and ``packed_position_ids``. How the mask reaches the model depends on its
attention implementation (``config._attn_implementation``):

- ``sdpa`` (the default on a CPU): attention unit by unit with the causal kernel
  (:func:`prefl.functional.segments.segment_attention`), so a row costs the sum of its units'
  attention, not ``L²``. The model's attention implementation is switched, on its first packed
  batch, to :data:`SEGMENTS` (registered with transformers on import), which is ``sdpa`` itself
  for every call that does not carry a layout (padded batches, generation), and the batch's spans
  travel to the attention layers as the keyword :data:`LAYOUT_KEY`. It holds every layout, prompt
  sharing included. A model with sliding-window attention takes the explicit mask below instead.
- ``eager``: an explicit additive ``(R, 1, L, L)`` mask, which transformers passes to the kernel
  as it is: position ``q`` sees ``k <= q`` of its own segment whose branch is the prompt's or
  ``q``'s own. It holds every layout, prompt sharing included.
- ``flash_attention_2`` / ``_3`` and ``flex_attention``: no mask, only the position ids, from which
  transformers finds the packed sequences itself (flash-attention's variable-length kernel, or a
  block-diagonal flex mask). That holds packing, not prompt sharing, whose rejected tokens must
  skip the chosen ones of their own unit: those raise :class:`PackedAttentionError`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from prefl.data.packing import SECOND
from prefl.functional.segments import row_spans, segment_attention
from prefl.functional.selected import indexed_logits, indexed_sequence_logps

#: The attention implementation prefl registers: ``sdpa``, unit by unit when a packed layout is
#: passed (as :data:`LAYOUT_KEY`), plain ``sdpa`` otherwise.
SEGMENTS = "prefl_segments"
#: The keyword that carries a packed batch's spans (:func:`prefl.functional.segments.row_spans`)
#: through the model's ``forward`` to its attention layers.
LAYOUT_KEY = "prefl_spans"
#: Implementations that take prefl's explicit mask, and those that find packed sequences from the
#: position ids (packing without prompt sharing).
EXPLICIT_MASK = ("sdpa", "eager", SEGMENTS)
FROM_POSITIONS = ("flash_attention_2", "flash_attention_3", "flex_attention")


def _segments_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function signature for :data:`SEGMENTS`: ``(B, H, T, D)`` query,
    key and value in, ``(B, T, H, D)`` out."""
    spans = kwargs.pop(LAYOUT_KEY, None)
    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise PackedAttentionError(
            "packed layouts: this model's attention has a sliding window or soft-capping, which "
            "prefl's unit-by-unit attention does not apply; use attn_implementation 'eager'"
        )
    out = segment_attention(query, key, value, spans, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENTS, _segments_forward)
AttentionMaskInterface.register(SEGMENTS, sdpa_mask)


class PackedAttentionError(ValueError):
    """The model's attention implementation cannot take the batch's layout."""


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation of ``model`` (``config._attn_implementation``; ``eager`` when
    the config does not say)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def layout_mask(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``(R, 1, L, L)`` bool, True where query ``q`` may attend to key ``k``.

    Args:
        segment: ``(R, L)`` the unit of each position within its row.
        branch: ``(R, L)`` 0 prompt, 1 chosen (or the SFT completion), 2 rejected.
    """
    length = segment.shape[1]
    index = torch.arange(length, device=segment.device)
    causal = index[:, None] >= index[None, :]
    same = segment[:, :, None] == segment[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (causal[None] & same & visible)[:, None]


def _windowed(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention has a sliding window (which unit-by-unit attention lacks)."""
    config = getattr(model, "config", None)
    return (
        bool(getattr(config, "sliding_window", None))
        and getattr(config, "use_sliding_window", True) is not False
    )


def packed_model_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of ``model`` for a packed batch: ``input_ids``, ``position_ids`` and
    ``attention_mask`` (and, for ``sdpa`` models, the spans as :data:`LAYOUT_KEY`; such a model's
    attention implementation becomes :data:`SEGMENTS`, see the module's docstring).

    Raises:
        PackedAttentionError: Prompt sharing with an implementation that finds sequences from
            the position ids, or an implementation prefl does not know how to mask.
    """
    impl = attention_implementation(model)
    inputs = {
        "input_ids": batch["packed_input_ids"],
        "position_ids": batch["packed_position_ids"],
    }
    shared = bool((batch["packed_branch"] == SECOND).any())
    if impl in ("sdpa", SEGMENTS) and not _windowed(model):
        model.config._attn_implementation = SEGMENTS
        spans = row_spans(batch["packed_segment"], batch["packed_branch"])
        ones = torch.ones_like(batch["packed_input_ids"])  # no padding: sdpa's mask is skipped
        return {**inputs, "attention_mask": ones, LAYOUT_KEY: spans}
    if impl in EXPLICIT_MASK:
        allowed = layout_mask(batch["packed_segment"], batch["packed_branch"])
        if impl == "eager":
            dtype = next(model.parameters()).dtype
            blocked = torch.finfo(dtype).min
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            allowed = additive.masked_fill(~allowed, blocked)
        return {**inputs, "attention_mask": allowed}
    if impl in FROM_POSITIONS and not shared:
        return {**inputs, "attention_mask": None}
    what = "prompt sharing" if shared else "packing"
    raise PackedAttentionError(
        f"{what}: attn_implementation {impl!r} cannot take this layout; use 'sdpa' or 'eager'"
        + ("" if shared else " (or flash_attention_2 / flex_attention, packing only)")
        + ", or turn share_prompt / packing off in the data module"
    )


def packed_sequence_logps(
    model: torch.nn.Module, batch: dict[str, Any], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed completion log-probs ``(S,)`` and completion lengths ``(S,)`` in a
    packed batch (numbered as :mod:`prefl.data.packing` says: for pairs, chosen then rejected);
    the LM head projects only the target positions."""
    return indexed_sequence_logps(
        model,
        packed_model_inputs(model, batch),
        batch["target_index"],
        batch["target_ids"],
        batch["target_sequence"],
        batch["last_index"].shape[0],
        chunk_size,
    )


def packed_scored_tokens(
    model: torch.nn.Module, batch: dict[str, Any], weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(logits, labels, mask)`` of a token loss over a packed batch's targets, as
    :func:`prefl.functional.selected.scored_tokens` gives them for padded rows: ``(1, N, V)``
    logits, ``(1, N)`` labels and an all-True ``(1, N)`` mask.

    Args:
        model: A causal LM.
        batch: A packed ``sft`` (or ``pairs``) batch.
        weights: ``(S,)`` per-sequence weights; the targets of a sequence of weight 0 (a
            data-parallel padding repeat) are left out. None = every target.
    """
    index, labels = batch["target_index"], batch["target_ids"]
    if weights is not None:
        keep = weights[batch["target_sequence"]] > 0
        index, labels = index[keep], labels[keep]
    logits = indexed_logits(model, packed_model_inputs(model, batch), index).unsqueeze(0)
    ones = torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits, labels.unsqueeze(0), ones
