"""The rollout half of :class:`~prefl.modules.ppo.PPOModule`, as a mixin.

:meth:`PPORolloutMixin.rollout` samples ``k`` responses per prompt, scores them, and computes
per-token KL, rewards and advantages, all without gradients. With ``offload_frozen`` the frozen
reference and reward models live on the CPU between rollouts and visit the accelerator only for
their forward passes here (the policy and critic stay put), the PPO analogue of
``precompute_ref_logps``: between rollouts the accelerator holds only what is trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from prefl.functional import gae, global_whiten
from prefl.functional.advantages import ADVANTAGE_ESTIMATORS
from prefl.generation.rollout import (
    response_logprobs,
    response_values,
    sample_responses,
    token_rewards,
)


class PPORolloutMixin:
    """Rollouts of :class:`~prefl.modules.ppo.PPOModule` (needs its attributes)."""

    def offloadable_models(self) -> list[torch.nn.Module]:
        """The frozen models that ``offload_frozen`` keeps on the CPU between rollouts: the
        reference copy (none with LoRA) and the reward model."""
        reward = self.scorer.reward_model if self.scorer is not None else None
        return [m for m in (self.reference, reward) if m is not None]

    def offload_frozen_models(self) -> None:
        """Move :meth:`offloadable_models` to the CPU (when ``offload_frozen`` is set)."""
        if self.cfg["offload_frozen"]:
            if self.sharded:
                raise ValueError(
                    "model.offload_frozen does not combine with a sharded strategy: the frozen "
                    "models are already sharded over the ranks"
                )
            for model in self.offloadable_models():
                model.to("cpu")

    @contextlib.contextmanager
    def frozen_on_device(self) -> Iterator[None]:
        """With ``offload_frozen``: the frozen models on the module's device for the block, and
        back on the CPU after it (also on error)."""
        if not self.cfg["offload_frozen"]:
            yield
            return
        for model in self.offloadable_models():
            model.to(self.device)
        try:
            yield
        finally:
            self.offload_frozen_models()

    def on_train_start(self) -> None:
        """Offload the frozen models before the first rollout (Lightning moved them all)."""
        super().on_train_start()
        self.offload_frozen_models()

    def rollout_seed(self, batch_idx: int) -> int:
        """Sampling seed of this rollout: a function of (seed, epoch, batch, rank)."""
        key = (self.cfg["seed"] * 1_000_003 + self.current_epoch) * 1_000_003 + batch_idx
        return (key * 1009 + self.global_rank) % (2**63)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        """Sample, score and compute advantages for one batch of prompts (no gradients)."""
        with self.frozen_on_device():
            return self._rollout(batch, seed)

    def _rollout(self, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        cfg, tok = self.cfg, self.resolve_tokenizer()
        k, temperature = cfg["num_samples"], cfg["temperature"]
        responses = sample_responses(
            self.model,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            k=k,
            temperature=temperature,
            max_new_tokens=cfg["max_new_tokens"],
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            seed=seed,
        )
        weights = batch.get("sample_weight")  # data-parallel padding repeats weigh 0
        weights = torch.ones(len(batch["prompt"])) if weights is None else weights
        weights = weights.to(responses.response_mask.device).repeat_interleave(k)
        mask = responses.response_mask.float() * weights[:, None]  # repeats: no loss, no stats
        logprobs, _ = response_logprobs(self.model, responses, temperature)
        with self.reference_context() as reference:
            ref_logprobs, _ = response_logprobs(reference, responses, temperature)
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        completions = tok.batch_decode(responses.response_ids, skip_special_tokens=True)
        scores = self.scorer(responses, prompts, completions)
        kl = (logprobs - ref_logprobs) * mask  # k1 per token: the sequence KL estimate
        beta = self.kl_ctl.value
        in_reward = cfg["kl_penalty"] == "reward"
        rewards = token_rewards(scores["score"], kl, mask, beta if in_reward else 0.0)
        values = returns = None
        if self.uses_critic:
            values = response_values(self.value_model, responses)
            advantages, returns = gae(rewards, values, mask, cfg["gamma"], cfg["lam"])
        else:
            estimator = ADVANTAGE_ESTIMATORS[cfg["advantage_estimator"]]
            advantages = estimator(rewards.sum(-1), k)[:, None] * mask
        if cfg["whiten_advantages"]:
            advantages = global_whiten(advantages, mask)  # over every rank's rollout
        return {
            "responses": responses,
            "mask": mask,
            "weights": weights,
            "logprobs": logprobs,
            "ref_logprobs": ref_logprobs,
            "values": values,
            "returns": returns,
            "advantages": advantages,
            "rewards": rewards,
            "kl": kl,
            "scores": scores,
            "prompts": prompts,
            "completions": completions,
        }
