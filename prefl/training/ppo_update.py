"""The PPO update loop, written out (design §5.8 and §5.10), as a plain function of a
:class:`~prefl.training.ppo_rollout.Rollout`.

For each rollout, :func:`ppo_update` makes ``ppo_epochs`` passes over a fresh permutation of its
responses, cut into minibatches; each minibatch is split into micro-batches whose gradients
accumulate (one ``backward`` each), then the caller's ``step`` clips and steps every optimizer
(policy, and critic for GAE) once. :class:`PPOLoss` is one micro-batch's objective: its losses are
sums over the micro-batch's valid tokens divided by :func:`token_norm`, the minibatch's token count
across all ranks over the world size (DDP averages gradients), so the update equals the
minibatch's token mean whatever the micro-batching or the sharding. The caller owns the
optimizers (manual optimisation: Lightning's ``optimizer_step`` hooks are not used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from prefl.functional import kl_penalty
from prefl.generation.rollout import response_logprobs, response_values
from prefl.losses.ppo import clipped_policy_loss, clipped_value_loss
from prefl.training.ppo_rollout import Rollout

#: One micro-batch's loss: ``(rollout, rows (M,), token normaliser) -> (loss, statistics)``, the
#: statistics named as :class:`UpdateStats`' fields; :class:`PPOLoss` is PPO's.
MicroBatchLoss = Callable[[Rollout, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class UpdateStats:
    """Statistics of one update: each the mean over its minibatches of this rank's share of the
    minibatch's token mean (their mean over ranks is the global token mean).

    Attributes:
        policy_loss: The clipped policy loss (without the KL term).
        clip_frac: Fraction of tokens whose ratio was clipped.
        approx_kl: Approximate KL between the old and the updated policy.
        entropy: Mean per-token entropy of the policy.
        value_loss: The clipped value loss; None without a critic.
        value_clip_frac: Fraction of tokens whose value was clipped; None without a critic.
    """

    policy_loss: float
    clip_frac: float
    approx_kl: float
    entropy: float
    value_loss: float | None = None
    value_clip_frac: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The statistics that are set, by name, in field order."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class PPOLoss:
    """The PPO objective of a micro-batch: clipped policy loss, the optional ``β·k3`` KL term,
    and (with a critic) the clipped value loss.

    Args:
        policy: The policy being trained.
        value_model: The critic being trained; None for the critic-free estimators.
        temperature: Sampling temperature; the log-probs divide the logits by it.
        clip_eps: PPO's policy ratio clip ε.
        value_clip_eps: Value clip ε.
        kl_coef: β of the per-token k3 KL to the reference added to the loss; None = no KL
            term (it is in the rewards).
    """

    policy: torch.nn.Module
    value_model: torch.nn.Module | None
    temperature: float
    clip_eps: float
    value_clip_eps: float
    kl_coef: float | None

    def __call__(
        self, rollout: Rollout, index: Tensor, norm: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of the rows ``index`` ``(M,)`` of ``rollout`` (token sums over ``norm``,
        see :func:`token_norm`) and their detached statistics, each this micro-batch's share of
        the minibatch's (summed over micro-batches, averaged over ranks: the token mean)."""
        sel, mask = rollout.responses.select(index), rollout.mask[index]
        logprobs, entropy = response_logprobs(self.policy, sel, self.temperature, True)
        old_logprobs, advantages = rollout.logprobs[index], rollout.advantages[index]
        pg_loss, clip_frac, approx_kl = clipped_policy_loss(
            logprobs, old_logprobs, advantages, mask, self.clip_eps, norm
        )
        loss = pg_loss
        if self.kl_coef is not None:
            k3 = kl_penalty(logprobs, rollout.ref_logprobs[index], "k3")
            loss = loss + self.kl_coef * (k3 * mask).sum() / norm
        share = mask.sum() / norm
        stats = {
            "policy_loss": pg_loss.detach(),
            "clip_frac": clip_frac * share,
            "approx_kl": approx_kl * share,
            "entropy": (entropy * mask).sum() / norm,
        }
        if self.value_model is not None:
            values = response_values(self.value_model, sel)
            old_values, returns = rollout.values[index], rollout.returns[index]
            vf_loss, v_clip = clipped_value_loss(
                values, old_values, returns, mask, self.value_clip_eps, norm
            )
            loss = loss + vf_loss  # the critic has its own optimizer and learning rate
            stats.update(value_loss=vf_loss.detach(), value_clip_frac=v_clip * share)
        # one loss, so one backward, over policy and critic (disjoint parameters: the same
        # gradients as two): DDP (find_unused_parameters=False) needs every trained parameter
        # in each backward
        return loss, stats


def token_norm(mask: Tensor, reduce: Callable[[Tensor], Tensor], world_size: int) -> Tensor:
    """Normaliser making each rank's loss sum a share of the global token mean: the tokens of
    ``mask`` on every rank over the world size (DDP averages gradients over ranks), at least 1.

    Args:
        mask: ``(M, R)`` this rank's minibatch mask.
        reduce: Sums a tensor over ranks (a collective; identity for one process).
        world_size: The number of ranks.
    """
    total = reduce(mask.sum().detach())
    return (total / world_size).clamp(min=1.0)


def ppo_update(
    rollout: Rollout,
    seed: int,
    loss_fn: MicroBatchLoss,
    *,
    backward: Callable[[Tensor], None],
    step: Callable[[], None],
    reduce: Callable[[Tensor], Tensor],
    world_size: int,
    ppo_epochs: int,
    mini_batch_size: int | None,
    micro_batch_size: int | None,
) -> UpdateStats:
    """``ppo_epochs`` passes of shuffled minibatches over ``rollout``.

    Args:
        rollout: The rollout (``N`` responses).
        seed: Seeds the permutations (a CPU generator; the global RNG is not used).
        loss_fn: One micro-batch's loss and statistics (a :class:`PPOLoss`); the statistics
            are summed over a minibatch's micro-batches, then averaged over the minibatches.
        backward: Backpropagates a micro-batch's loss (e.g. Lightning's ``manual_backward``).
        step: Clips and steps every optimizer once, then zeroes their gradients.
        reduce: Sums a tensor over ranks (for :func:`token_norm`; one call per minibatch).
        world_size: The number of ranks.
        ppo_epochs: Passes over the rollout.
        mini_batch_size: Responses per optimizer step; None = the whole rollout.
        micro_batch_size: Responses per forward/backward inside a minibatch; None = the whole
            minibatch.

    Returns:
        The mean of each statistic over the minibatches (each already a minibatch token mean),
        as :class:`UpdateStats`.
    """
    n = rollout.mask.shape[0]
    mb = mini_batch_size or n
    micro = micro_batch_size or mb
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    count = 0
    for _ in range(ppo_epochs):
        order = torch.randperm(n, generator=generator).to(rollout.mask.device)
        for start in range(0, n, mb):
            minibatch = order[start : start + mb]
            norm = token_norm(rollout.mask[minibatch], reduce, world_size)
            stats: dict[str, Tensor] = {}
            for m_start in range(0, len(minibatch), micro):
                loss, part = loss_fn(rollout, minibatch[m_start : m_start + micro], norm)
                backward(loss)
                for key, value in part.items():
                    stats[key] = stats.get(key, 0.0) + value
            step()
            count += 1
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + float(value)
    return UpdateStats(**{key: value / count for key, value in totals.items()})
