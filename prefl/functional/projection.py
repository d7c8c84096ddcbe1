"""The vocabulary projection of an LM head, and its tied input embedding, made cheaper on a CPU.

Two costs of the output projection ``logits = hidden @ weight.T`` show up on a CPU when the
vocabulary is large (SmolLM2: 49k rows of 576) and only a few hundred positions are projected:

- **The forward matrix product.** One ``(N, H) @ (H, V)`` product writes a ``(N, V)`` result far
  larger than the cache, and BLAS runs it at about 60% of the speed of the backward's products of
  the same size. Done in slices of :data:`SLICE_ROWS` vocabulary rows, each slice's result stays in
  cache. The backward is the two usual products, unsliced: they are already fast.
- **A tied input embedding's gradient.** The embedding's backward builds a dense ``(V, H)``
  gradient that is zero except on the rows of the batch's tokens, and autograd then adds it to the
  head's own dense ``(V, H)`` gradient: two passes over the whole matrix for a few hundred rows.
  Asked for a sparse gradient instead (``nn.Embedding.sparse``), the embedding hands autograd just
  those rows, which it adds into the head's dense gradient before the weight's gradient is stored;
  the weight still ends with one dense gradient. This is only right when the head's gradient is
  there to add to: :func:`cpu_head_speedups` checks that the weights are one tensor, and its
  callers (:mod:`prefl.functional.selected`) make the head's output part of every loss.

Both are exact up to float summation order. ``benchmarks/vocab_head.py`` times the head of an
HH batch with and without them (and the CPU log-softmax chunks of :mod:`prefl.functional.logps`):
1.18x faster with gradients, 1.35x without. GPUs keep the plain paths (their products and
bandwidth do not have these costs). Torch only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

#: Vocabulary rows per slice of the forward product (a ``(N, 1024)`` float32 slice of 336 rows is
#: 1.4 MiB: it stays in the last-level cache while BLAS writes it).
SLICE_ROWS = 1024


class _SlicedProjection(torch.autograd.Function):
    """``hidden @ weight.T`` computed in vocabulary slices; backward by the two plain products."""

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: Tensor, weight: Tensor, rows: int) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        vocab = weight.shape[0]
        # the result itself, not a view of it: callers may modify logits in place
        out = torch.empty(*hidden.shape[:-1], vocab, dtype=hidden.dtype, device=hidden.device)
        rows_out = out.view(-1, vocab)
        for start in range(0, vocab, rows):
            rows_out[:, start : start + rows] = flat @ weight[start : start + rows].t()
        ctx.save_for_backward(flat, weight)
        ctx.shape = hidden.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        flat, weight = ctx.saved_tensors
        grad = grad.reshape(-1, weight.shape[0])
        grad_hidden = (grad @ weight).view(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ flat if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def vocab_projection(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, slice_rows: int = SLICE_ROWS
) -> Tensor:
    """``hidden @ weight.T + bias``, the LM head's projection; on a CPU in vocabulary slices.

    Equal to ``torch.nn.functional.linear(hidden, weight, bias)`` in value and gradients (up to
    float summation order). Off a CPU, with a bias or under CPU autocast (mixed precision), it is
    exactly that call.

    Args:
        hidden: ``(..., H)`` hidden states (e.g. ``(1, N, H)``: the selected positions).
        weight: ``(V, H)`` the head's weight (the embedding matrix when tied).
        bias: ``(V,)`` or None.
        slice_rows: Vocabulary rows per slice of the forward product (positive).

    Returns:
        ``(..., V)`` logits in ``hidden``'s dtype.

    Raises:
        ValueError: If ``slice_rows`` is not positive or the hidden sizes differ.
    """
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be a positive number of rows, got {slice_rows}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match the weight's {tuple(weight.shape)}"
        )
    if (
        hidden.device.type != "cpu"
        or bias is not None
        or slice_rows >= weight.shape[0]
        or torch.is_autocast_enabled("cpu")  # autocast's own casts (e.g. bf16-mixed) apply
    ):
        return torch.nn.functional.linear(hidden, weight, bias)
    return _SlicedProjection.apply(hidden, weight, slice_rows)


def _plain_linear(head: torch.nn.Module) -> bool:
    """Whether ``head`` runs ``torch.nn.Linear``'s own forward (not a LoRA layer or a wrapper)."""
    return (
        isinstance(head, torch.nn.Linear)
        and type(head).forward is torch.nn.Linear.forward
        and "forward" not in vars(head)
    )


def _tied_embedding(model: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Embedding | None:
    """The model's input embedding if it is a plain ``nn.Embedding`` sharing ``head``'s weight,
    trained (requires grad), dense and without ``max_norm``; else None."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if (
        type(embedding) is not torch.nn.Embedding
        or embedding.weight is not getattr(head, "weight", None)
        or not embedding.weight.requires_grad
        or embedding.sparse
        or embedding.max_norm is not None
    ):
        return None
    return embedding


@contextmanager
def cpu_head_speedups(model: torch.nn.Module, head: torch.nn.Module) -> Iterator[None]:
    """Within this block, ``model``'s forward uses the faster CPU paths of the module docstring.

    ``head`` (a plain ``nn.Linear`` on a CPU) projects with :func:`vocab_projection`, and, when
    gradients are on and ``head`` shares its weight with the model's input embedding, the
    embedding hands autograd a sparse gradient that is added into the head's dense one. Both are
    undone on leaving the block; anything else (a GPU, LoRA, a wrapped head, a compiled model) is
    left as it is. The head's output must reach every backward that reaches the embedding (as in
    :mod:`prefl.functional.selected`, whose logits are the loss's); otherwise the weight's
    gradient would be left sparse.

    Args:
        model: A causal LM whose ``forward`` calls ``head`` on the hidden states it projects.
        head: Its output projection (``model.get_output_embeddings()``).
    """
    weight = getattr(head, "weight", None)
    compiled = hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None)
    if compiled or not _plain_linear(head) or weight is None or weight.device.type != "cpu":
        yield
        return
    embedding = _tied_embedding(model, head) if torch.is_grad_enabled() else None

    def forward(input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear.forward's own name
        return vocab_projection(input, head.weight, head.bias, SLICE_ROWS)

    head.forward = forward
    if embedding is not None:
        embedding.sparse = True
    try:
        yield
    finally:
        with suppress(AttributeError):
            del head.forward
        if embedding is not None:
            embedding.sparse = False
