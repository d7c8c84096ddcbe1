"""The PPO update loop, written out (design §5.8 and §5.10), as a mixin of :class:`PPOModule`.

For each rollout: ``ppo_epochs`` passes over a fresh permutation of its responses, cut into
minibatches; each minibatch is split into micro-batches whose gradients accumulate, then every
optimizer (policy, and critic for GAE) clips its gradient norm and steps once. Losses are sums over
a micro-batch's valid tokens divided by the minibatch's token count across all ranks (times the
world size, because DDP averages gradients), so the update equals the minibatch's token mean
whatever the micro-batching or the sharding. Lightning's ``optimizer_step`` hooks are not used.
"""

from __future__ import annotations

from typing import Any

import torch

from prefl.functional import kl_penalty
from prefl.generation.rollout import response_logprobs, response_values
from prefl.losses.ppo import clipped_policy_loss, clipped_value_loss


class PPOUpdateMixin:
    """The update half of :class:`~prefl.modules.ppo.PPOModule` (needs its attributes)."""

    def _token_norm(self, mask: torch.Tensor) -> torch.Tensor:
        """Normaliser making each rank's loss sum a share of the global token mean (DDP averages
        gradients over ranks, hence the world-size factor)."""
        total = self.trainer.strategy.reduce(mask.sum().detach(), reduce_op="sum")
        return (total / self.trainer.world_size).clamp(min=1.0)

    def _micro_step(self, r: dict[str, Any], idx: torch.Tensor, norm: torch.Tensor) -> dict:
        cfg, sel = self.cfg, r["responses"].select(idx)
        mask = r["mask"][idx]
        logprobs, entropy = response_logprobs(self.model, sel, cfg["temperature"], True)
        pg_loss, clip_frac, approx_kl = clipped_policy_loss(
            logprobs, r["logprobs"][idx], r["advantages"][idx], mask, cfg["clip_eps"], norm
        )
        loss = pg_loss
        if cfg["kl_penalty"] == "loss":
            k3 = kl_penalty(logprobs, r["ref_logprobs"][idx], "k3")
            loss = loss + self.kl_ctl.value * (k3 * mask).sum() / norm
        share = mask.sum() / norm  # summed over micro-batches and averaged over ranks: token mean
        out = {
            "policy_loss": pg_loss.detach(),
            "clip_frac": clip_frac * share,
            "approx_kl": approx_kl * share,
            "entropy": (entropy * mask).sum() / norm,
        }
        if self.uses_critic:
            values = response_values(self.value_model, sel)
            vf_loss, v_clip = clipped_value_loss(
                values, r["values"][idx], r["returns"][idx], mask, cfg["value_clip_eps"], norm
            )
            loss = loss + vf_loss  # the critic has its own optimizer and learning rate
            out.update(value_loss=vf_loss.detach(), value_clip_frac=v_clip * share)
        # one backward over policy and critic (disjoint parameters, so the same gradients as two):
        # DDP (find_unused_parameters=False) needs every trained parameter in each backward
        self.manual_backward(loss)
        return out

    def _optimizer_step(self, optimizer: Any) -> None:
        if self.cfg["max_grad_norm"] is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.cfg["max_grad_norm"],
                gradient_clip_algorithm="norm",
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def ppo_update(self, r: dict[str, Any], seed: int) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches over rollout ``r``; returns the mean of
        each statistic over the minibatches (each already a minibatch token mean)."""
        cfg = self.cfg
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        n = r["mask"].shape[0]
        mb = cfg["mini_batch_size"] or n
        micro = cfg["micro_batch_size"] or mb
        generator = torch.Generator().manual_seed(seed)
        totals: dict[str, float] = {}
        count = 0
        for _ in range(cfg["ppo_epochs"]):
            order = torch.randperm(n, generator=generator).to(r["mask"].device)
            for start in range(0, n, mb):
                minibatch = order[start : start + mb]
                norm = self._token_norm(r["mask"][minibatch])
                stats: dict[str, torch.Tensor] = {}
                for m_start in range(0, len(minibatch), micro):
                    part = self._micro_step(r, minibatch[m_start : m_start + micro], norm)
                    for key, value in part.items():
                        stats[key] = stats.get(key, 0.0) + value
                for optimizer in optimizers:
                    self._optimizer_step(optimizer)
                self.update_steps += 1
                count += 1
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
        return {key: value / count for key, value in totals.items()}
