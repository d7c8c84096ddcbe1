"""PPOModule: RLHF with PPO (clipped policy and value losses, KL to the SFT model), and the
critic-free estimators RLOO, GRPO and REINFORCE++-baseline, under manual optimisation.

One ``training_step`` is one rollout and its update, written out (design §5.10): sample ``k``
responses per prompt (:mod:`prefl.generation.rollout`), score them
(:class:`~prefl.generation.rewards.Scorer`),
compute per-token KL and rewards, advantages (GAE with the critic, or a critic-free estimator over
each prompt's group), then ``ppo_epochs`` passes of shuffled minibatches, each split into
micro-batches whose gradients accumulate into one clipped optimizer step. Loss token means are
taken over the whole minibatch across all ranks, so they do not depend on micro-batching or on
data-parallel sharding (§5.8). Per rollout the policy optimizer steps exactly
``ppo_epochs × ceil(N / mini_batch_size)`` times (``N`` = prompts × ``num_samples``).
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import PreTrainedTokenizerBase

from prefl.functional import explained_variance
from prefl.functional.advantages import ADVANTAGE_ESTIMATORS
from prefl.generation.rewards import Scorer, resolve_reward_fn
from prefl.generation.rollout import Responses, response_logprobs
from prefl.models import CausalLMSpec, disable_dropout
from prefl.models.reward import RewardModel
from prefl.models.value import build_value_model, critic_spec
from prefl.modules.reference import ReferenceModule
from prefl.training.kl_control import KLController
from prefl.training.ppo_rollout import PPORolloutMixin
from prefl.training.ppo_update import PPOUpdateMixin

Estimator = Literal["gae", "rloo", "grpo", "reinforce_baseline"]


class PPOModule(PPORolloutMixin, PPOUpdateMixin, ReferenceModule):
    """PPO (or RLOO / GRPO / REINFORCE++-baseline) on ``prompts`` batches.

    Args:
        model: The policy: a :class:`~prefl.models.CausalLMSpec` or a hub id / local path (e.g.
            the SFT export). The reference is a frozen copy (LoRA: adapters disabled).
        tokenizer: The tokenizer; None = the data module's (the CLI links them).
        reward_model: Path of a reward-model export (frozen; normalised with its stored stats).
        reward_fns: Reward functions, ``"toy"`` (the toy oracle) or ``"package.module:function"``
            with ``fn(prompts, completions) -> list[float]``.
        reward_weights: One weight per reward source: the reward model first, then the
            functions; None = all 1.
        value_model: Where the critic (GAE only) starts: a reward-model export or checkpoint
            path; None = ``reward_model`` if set, else the policy's source with a new head. It
            trains like the policy: with LoRA, adapters of its own and the head in full.
        advantage_estimator: ``gae`` (with the critic), ``rloo``, ``grpo`` or
            ``reinforce_baseline`` (critic-free, over the ``num_samples`` responses of a prompt).
        num_samples: Responses sampled per prompt (``k``; ≥ 2 for ``rloo`` and ``grpo``).
        temperature: Sampling temperature; every log-prob divides the logits by it.
        max_new_tokens: Most tokens per response.
        kl_coef: Initial KL coefficient β.
        kl_penalty: ``reward`` (β·k1 per token in the reward) or ``loss`` (β·k3 per token added to
            the policy loss).
        kl_target: Target sequence KL for the adaptive controller; None = fixed β.
        kl_horizon: Horizon (in responses) of the adaptive controller.
        normalize_reward: Normalise the reward model's score with its stored mean/std.
        reward_clip: Clip scores to ``[-reward_clip, reward_clip]``; None = no clipping.
        no_eos_score: Score of responses that never emit EOS; None = no penalty.
        gamma: GAE discount γ.
        lam: GAE λ.
        whiten_advantages: Whiten advantages over the valid tokens of the rollout (of every
            data-parallel rank together, as one batch would be).
        ppo_epochs: Passes over each rollout.
        mini_batch_size: Responses per optimizer step; None = the whole rollout.
        micro_batch_size: Responses per forward/backward inside a minibatch (gradient
            accumulation); None = the whole minibatch.
        clip_eps: PPO's policy ratio clip ε.
        value_clip_eps: Value clip ε.
        max_grad_norm: Gradient-norm clip of each optimizer step; None = no clipping.
        optimizer: Builds the policy optimizer.
        value_optimizer: Builds the critic optimizer (its own learning rate).
        log_samples_every: Log a table of sample prompts/responses/scores to TensorBoard every
            this many rollouts; 0 = never.
        seed: Sampling seed; rollouts use (seed, epoch, batch, rank), so ranks differ and a
            resumed run samples what the uninterrupted one would have.
        offload_frozen: Keep the frozen reference and reward models on the CPU between
            rollouts, moving them to the accelerator only to score a rollout (saves their
            memory during the update; costs two host-device copies per rollout). Not with a
            sharded strategy (sharding already splits them).
        max_nonfinite_steps: Consecutive optimizer steps with a NaN/inf loss or gradient that
            are skipped before the run stops (see :mod:`prefl.training.guard`).
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        reward_model: str | None = None,
        reward_fns: list[str] | None = None,
        reward_weights: list[float] | None = None,
        value_model: str | None = None,
        advantage_estimator: Estimator = "gae",
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        kl_coef: float = 0.05,
        kl_penalty: Literal["reward", "loss"] = "reward",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        normalize_reward: bool = True,
        reward_clip: float | None = None,
        no_eos_score: float | None = -1.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        max_grad_norm: float | None = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        value_optimizer: OptimizerCallable = torch.optim.AdamW,
        log_samples_every: int = 10,
        seed: int = 0,
        offload_frozen: bool = False,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, None, max_nonfinite_steps)
        if advantage_estimator != "gae" and advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"model.advantage_estimator={advantage_estimator!r}; expected gae "
                f"or one of {sorted(ADVANTAGE_ESTIMATORS)}"
            )
        if advantage_estimator in ("rloo", "grpo") and num_samples < 2:
            raise ValueError(f"model.num_samples must be >= 2 for {advantage_estimator}")
        n_sources = len(reward_fns or []) + (reward_model is not None)
        if n_sources == 0:
            raise ValueError("PPO needs a reward: set model.reward_model and/or model.reward_fns")
        if reward_weights is not None and len(reward_weights) != n_sources:
            raise ValueError(
                f"model.reward_weights has {len(reward_weights)} values for "
                f"{n_sources} reward sources (reward model first, then functions)"
            )
        self.automatic_optimization = False
        self.reference = None
        self.cfg = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "__class__", "model", "tokenizer", "optimizer", "value_optimizer")
        }
        self.value_optimizer_factory = value_optimizer
        self.kl_ctl = KLController(kl_coef, kl_target, kl_horizon)
        self.scorer: Scorer | None = None
        self.value_model: torch.nn.Module | None = None
        self.update_steps = 0

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator is GAE (with the value model)."""
        return self.cfg["advantage_estimator"] == "gae"

    def build_models(self) -> None:
        """Build policy, reference, reward model(s) and, for GAE, the value model."""
        super().build_models()
        self.build_reference()
        tokenizer, cfg = self.resolve_tokenizer(), self.cfg
        reward_model = None
        if cfg["reward_model"] is not None:
            reward_model = RewardModel.from_pretrained(cfg["reward_model"])
            for p in reward_model.parameters():
                p.requires_grad_(False)
            disable_dropout(reward_model)
        fns = [resolve_reward_fn(name) for name in cfg["reward_fns"] or []]
        weights = cfg["reward_weights"] or [1.0] * (len(fns) + (reward_model is not None))
        same = reward_model is None or reward_model.tokenizer.get_vocab() == tokenizer.get_vocab()
        self.scorer = Scorer(
            reward_model,
            fns,
            weights,
            cfg["normalize_reward"],
            cfg["no_eos_score"],
            cfg["reward_clip"],
            same,
        )
        if self.uses_critic:
            source = critic_spec(self.model_spec, cfg["value_model"] or cfg["reward_model"])
            self.value_model = build_value_model(source, tokenizer)
            disable_dropout(self.value_model)

    def shardable_models(self) -> list[torch.nn.Module]:
        """Policy, reference, reward model and value model: each its own FSDP2 root."""
        extra = [self.scorer.reward_model, self.value_model]
        return [*super().shardable_models(), *(m for m in extra if m is not None)]

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The reference and the reward model stay out of checkpoints (rebuilt from paths)."""
        frozen = super().frozen_modules()
        if self.sharded:
            return frozen
        if self.scorer is not None and self.scorer.reward_model is not None:
            frozen["scorer.reward_model"] = self.scorer.reward_model
        return frozen

    def configure_optimizers(self) -> Any:
        """The policy optimizer and, for GAE, the value optimizer (its own learning rate)."""
        policy = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if not self.uses_critic:
            return policy
        critic = [p for p in self.value_model.parameters() if p.requires_grad]  # LoRA: adapters
        return [policy, self.value_optimizer_factory(critic)]

    def forward(self, responses: Responses) -> torch.Tensor:
        """Policy log-probs ``(N, R)`` of the responses (logits divided by the temperature)."""
        return response_logprobs(self.model, responses, self.cfg["temperature"])[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One rollout and its PPO update; logs design §5.12's quantities."""
        seed = self.rollout_seed(batch_idx)
        r = self.rollout(batch, seed)
        stats = self.ppo_update(r, seed)
        mask, weights = r["mask"], r["weights"]
        sequence_kl, scores = r["kl"].sum(-1), r["scores"]
        per_response = {
            "ppo/score": scores["score"],
            "ppo/score_raw": scores["raw"],
            "ppo/reward": r["rewards"].sum(-1),
            "ppo/kl": sequence_kl,
            "ppo/response_length": r["responses"].response_mask.float().sum(-1),
            "ppo/eos_rate": r["responses"].ended.float(),
            **{f"ppo/score_{k}": v for k, v in scores.items() if k not in ("score", "raw")},
        }
        per_token = {"ppo/advantage_mean": r["advantages"]}
        if self.uses_critic:
            per_token["ppo/value_mean"] = r["values"]
        # global means over every rank's real responses (or tokens), in one all-reduce
        sums = [(v.float() * weights).sum() for v in per_response.values()]
        sums += [(v * mask).sum() for v in per_token.values()] + [weights.sum(), mask.sum()]
        *totals, real, tokens = self.trainer.strategy.reduce(torch.stack(sums), reduce_op="sum")
        counts = [real] * len(per_response) + [tokens] * len(per_token)
        names = [*per_response, *per_token]
        exact = {k: t / c for k, t, c in zip(names, totals, counts, strict=True)}
        per_rank = {
            "ppo/kl_coef": torch.tensor(self.kl_ctl.value),
            **{f"ppo/{k}": torch.tensor(v) for k, v in stats.items()},
        }
        if self.uses_critic:
            per_rank["ppo/explained_variance"] = explained_variance(r["values"], r["returns"], mask)
        n = int(real)
        log = {"on_step": True, "on_epoch": False, "batch_size": n, "prog_bar": False}
        self.log_dict({k: v.float() for k, v in exact.items()}, **log)
        # on the module's device: NCCL has no CPU backend for the sync_dist all-reduce
        self.log_dict(
            {k: v.float().to(self.device) for k, v in per_rank.items()}, sync_dist=True, **log
        )
        self.log("ppo/score_step", exact["ppo/score"], prog_bar=True, batch_size=n)
        self.kl_ctl.update(float(exact["ppo/kl"]), n)
        every = self.cfg["log_samples_every"]
        if every and batch_idx % every == 0:
            self._log_samples(r)

    def _log_samples(self, r: dict[str, Any], rows: int = 8) -> None:
        """A markdown table of prompts, responses and scores to TensorBoard."""
        lines = ["| prompt | response | score |", "|---|---|---|"]
        scores = r["scores"]["score"].tolist()
        for prompt, completion, score in list(
            zip(r["prompts"], r["completions"], scores, strict=True)
        )[:rows]:
            clean = [t.replace("|", "\\|").replace("\n", " ") for t in (prompt, completion)]
            lines.append(f"| {clean[0]} | {clean[1]} | {score:+.3f} |")
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("ppo/samples", "\n".join(lines), self.update_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also save the KL controller, the update counter and the RNG states."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["prefl_ppo"] = {
            "kl_controller": self.kl_ctl.state_dict(),
            "update_steps": self.update_steps,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` added."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("prefl_ppo")
        if state:
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.update_steps = state["update_steps"]
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
