"""An exact token mean over a gradient-accumulation window.

With ``Trainer(accumulate_grad_batches=k)`` Lightning divides each micro-batch's loss by ``k``
and sums the gradients, so a module that returns each micro-batch's token mean trains on the
*mean of micro-batch means*: a 4-token micro-batch then weighs as much as a 52-token one. The
step that the same rows give as one batch is the gradient of ``sum of token losses / number of
tokens`` over the whole window, and the token count of the window is only known after its last
micro-batch.

:class:`TokenMeanWindow` gets there without looking ahead. Each micro-batch returns its token-loss
sum divided by a *reference* count (the global token count of the window's first micro-batch,
so the loss stays of order one for fp16's gradient scaler) times the world size; the window's
global token count is summed along the way (the counts are all-reduced per micro-batch anyway).
Right before the optimizer step (``on_before_optimizer_step``: after DDP / FSDP have reduced the
gradients and fp16 has unscaled them, before gradient clipping) every gradient is multiplied by
``k · reference / window tokens``. The result is the gradient of the window's token mean over
every rank, also for the shorter last window of an epoch (Lightning still divides by ``k``).
With one micro-batch per step the factor is exactly 1 and nothing is touched.

DeepSpeed keeps gradients inside its engine, out of the reach of this hook: there the module
warns and the mean stays per micro-batch.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


class TokenMeanWindow:
    """The running token counts of one accumulation window (see the module docstring)."""

    def __init__(self) -> None:
        self.reference: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def loss(self, token_loss_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch on this rank: ``token_loss_sum · world / reference``.

        Args:
            token_loss_sum: Scalar sum of this rank's per-token losses, with gradient.
            n_tokens: Scalar count of the tokens in that sum (this rank's).
        """
        count = n_tokens.detach().to(torch.float64).reshape(())
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            count = count.clone()
            torch.distributed.all_reduce(count)
        if self.reference is None:
            self.reference = count.clamp(min=1)
            self.tokens = torch.zeros_like(count)
        self.tokens = self.tokens + count
        return token_loss_sum * (world / self.reference).to(token_loss_sum.dtype)

    def factor(self, accumulate_grad_batches: int) -> float:
        """``k · reference / window tokens``: what turns the accumulated gradient into the
        gradient of the window's token mean (1.0 for an empty window)."""
        if self.reference is None:
            return 1.0
        return float(accumulate_grad_batches * self.reference / self.tokens.clamp(min=1))

    def rescale(self, optimizer: torch.optim.Optimizer, accumulate_grad_batches: int) -> float:
        """Multiply every gradient of ``optimizer`` by :meth:`factor` and start a new window;
        returns the factor."""
        factor = self.factor(accumulate_grad_batches)
        self.reference = self.tokens = None
        if factor != 1.0:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        grad = param.grad
                        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(factor)
        return factor
