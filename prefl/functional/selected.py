"""Logits at chosen positions only: the LM head projects just the rows a loss reads.

A causal LM's output projection turns every position's hidden state into ``V`` logits, but DPO,
SFT and sample scoring read the logits only where the next token is a completion token (about
40% of the positions on typical preference data, where prompts are long). For a 32k vocabulary
the projection, its backward and the log-softmax over the unread rows are a large share of a
small model's step.

:func:`selected_logits` runs the model's own ``forward`` (so FSDP2's root hooks, DeepSpeed's
parameter gathering, LoRA wrappers and logit soft-capping all still apply) with a forward
pre-hook on the output embedding that keeps only the selected hidden rows before the
projection. Models without ``get_output_embeddings`` fall back to full logits, then select. On a
CPU the projection and a tied embedding's gradient take the faster paths of
:mod:`prefl.functional.projection`.
"""

from __future__ import annotations

import torch

from prefl.functional import next_token_targets, token_logps
from prefl.functional.projection import cpu_head_speedups


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that projects hidden states to vocabulary logits, or None if not found.

    Args:
        model: A Hugging Face causal LM, possibly wrapped by ``peft`` (whose attribute lookup
            reaches the base model's ``get_output_embeddings``).
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def selected_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Logits ``(N, V)`` at the ``N`` positions where ``positions`` is True, in row-major order.

    Equal to ``model(input_ids, attention_mask).logits[positions]``, but the output projection
    sees only the selected rows (forward and backward).

    Args:
        model: A causal LM taking ``input_ids``, ``attention_mask`` and ``use_cache``.
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)``, 1 on real tokens, 0 on padding.
        positions: ``(B, T)`` bool, True where the logits are wanted.

    Returns:
        ``(N, V)`` logits with ``N = positions.sum()``, ordered by row then position (the order
        of ``positions.nonzero()``).
    """
    positions = positions.to(torch.bool)
    head = output_head(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if head is None:
        return model(**kwargs).logits[positions]
    seen: list[bool] = []

    def keep_rows(module: torch.nn.Module, args: tuple) -> tuple | None:
        if seen or not args or args[0].shape[:2] != positions.shape:
            return None  # a second call, a keyword call or sliced hidden states: leave them
        seen.append(True)
        return (args[0][positions].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(keep_rows)
    try:
        with cpu_head_speedups(model, head):
            logits = model(**kwargs).logits
    finally:
        handle.remove()
    if not seen:  # the head was bypassed or saw other shapes: select from the full logits
        return logits[positions]
    return logits.squeeze(0)


def scored_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(logits, labels, mask)`` of a token loss, cut down to the ``N`` scored positions.

    Args:
        model: A causal LM taking ``input_ids``, ``attention_mask`` and ``use_cache``.
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)``, 1 on real tokens, 0 on padding.
        labels: ``(B, T)`` targets aligned with the logits (see ``next_token_targets``).
        mask: ``(B, T)`` bool, True on the positions to score.

    Returns:
        ``(1, N, V)`` logits, ``(1, N)`` labels and an all-True ``(1, N)`` mask: the inputs of
        ``token_logps`` or ``sft_loss``, flattened to the scored tokens in row-major order.
    """
    logits = selected_logits(model, input_ids, attention_mask, mask).unsqueeze(0)
    ones = torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits, labels[mask].unsqueeze(0), ones


def masked_sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of each row's next-token log-probs over its loss-mask tokens, projecting only those.

    ``sums[b] = sum_t loss_mask[b, t] * log p(input_ids[b, t] | input_ids[b, :t])`` for
    ``t >= 1``, the same as ``sequence_logps(model(...).logits, *next_token_targets(ids,
    loss_mask))`` up to summation order.

    Args:
        model: A causal LM taking ``input_ids``, ``attention_mask`` and ``use_cache``.
        input_ids: ``(B, T)`` token ids, right-padded.
        attention_mask: ``(B, T)``, 1 on real tokens, 0 on padding.
        loss_mask: ``(B, T)``, 1 on the tokens to score (completions), 0 elsewhere.
        chunk_size: Rows per chunk of the log-softmax (see :func:`prefl.functional.token_logps`).

    Returns:
        ``(sums, lengths)``: ``(B,)`` float32 log-prob sums and ``(B,)`` scored-token counts.
    """
    labels, mask = next_token_targets(input_ids, loss_mask)
    scored = scored_tokens(model, input_ids, attention_mask, labels, mask)
    logps = token_logps(*scored, chunk_size)[0]
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=logps.dtype, device=logps.device)
    return sums.index_add(0, rows, logps), mask.sum(-1)


def indexed_logits(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor | None], index: torch.Tensor
) -> torch.Tensor:
    """Logits ``(N, V)`` at the ``N`` flat positions ``index`` of the model's ``(R, L)`` input.

    Equal to ``model(**inputs).logits.flatten(0, 1)[index]``, but the output projection sees only
    those rows; an index may repeat (a packed, prompt-shared pair predicts both completions'
    first tokens at the prompt's last position).

    Args:
        model: A causal LM.
        inputs: Its keyword inputs: ``input_ids`` ``(R, L)`` and whatever else the layout needs
            (``position_ids``, a 4D ``attention_mask``; see
            :func:`prefl.models.packed.packed_model_inputs`).
        index: ``(N,)`` flat positions ``row * L + column``.
    """
    shape = inputs["input_ids"].shape
    head = output_head(model)
    if head is None:
        return model(**inputs, use_cache=False).logits.flatten(0, 1)[index]
    seen: list[bool] = []

    def keep_rows(module: torch.nn.Module, args: tuple) -> tuple | None:
        if seen or not args or args[0].shape[:2] != shape:
            return None  # a second call, a keyword call or sliced hidden states: leave them
        seen.append(True)
        return (args[0].flatten(0, 1)[index].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(keep_rows)
    try:
        with cpu_head_speedups(model, head):
            logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    return logits.squeeze(0) if seen else logits.flatten(0, 1)[index]


def indexed_sequence_logps(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor | None],
    target_index: torch.Tensor,
    target_ids: torch.Tensor,
    target_sequence: torch.Tensor,
    num_sequences: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of target log-probs in a packed layout (:mod:`prefl.data.packing`).

    ``sums[s] = sum over n with target_sequence[n] == s of log p(target_ids[n])`` under the logits
    at ``target_index[n]``; the projection sees only those ``N`` positions.

    Args:
        model: A causal LM.
        inputs: Its keyword inputs for the packed ``(R, L)`` rows.
        target_index: ``(N,)`` flat positions whose logits predict each target.
        target_ids: ``(N,)`` the target tokens.
        target_sequence: ``(N,)`` the sequence (``0..num_sequences-1``) each target belongs to.
        num_sequences: ``S``.
        chunk_size: Rows per chunk of the log-softmax (see :func:`prefl.functional.token_logps`).

    Returns:
        ``(sums, lengths)``: ``(S,)`` float32 log-prob sums and ``(S,)`` target counts.
    """
    logits = indexed_logits(model, inputs, target_index).unsqueeze(0)
    ones = torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)
    logps = token_logps(logits, target_ids.unsqueeze(0), ones, chunk_size=chunk_size)[0]
    sums = torch.zeros(num_sequences, dtype=logps.dtype, device=logps.device)
    lengths = torch.bincount(target_sequence, minlength=num_sequences)
    return sums.index_add(0, target_sequence, logps), lengths
