"""PPOModule: RLHF with PPO (clipped policy and value losses, KL to the SFT model), and the
critic-free estimators RLOO, GRPO and REINFORCE++-baseline, under manual optimisation.

One ``training_step`` is one rollout and its update, written out (design §5.10): sample ``k``
responses per prompt, score them and compute per-token KL, rewards and advantages (GAE with
the critic, or a critic-free estimator over each prompt's group) into a typed
:class:`~prefl.training.ppo_rollout.Rollout` (:func:`~prefl.training.ppo_rollout.collect_rollout`),
then ``ppo_epochs`` passes of shuffled minibatches, each split into micro-batches whose
gradients accumulate into one clipped optimizer step
(:func:`~prefl.training.ppo_update.ppo_update`).
Loss token means are taken over the whole minibatch across all ranks, so they do not depend on
micro-batching or on data-parallel sharding (§5.8). Per rollout the policy optimizer steps exactly
``ppo_epochs × ceil(N / mini_batch_size)`` times (``N`` = prompts × ``num_samples``). The module
holds the models, the settings (one attribute per argument), the optimizers and the logging.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import PreTrainedTokenizerBase

from prefl.generation.rewards import Scorer, build_scorer, check_reward_sources
from prefl.generation.rollout import Responses, response_logprobs
from prefl.models import CausalLMSpec, disable_dropout
from prefl.models.value import build_value_model, critic_spec
from prefl.modules.reference import ReferenceModule
from prefl.training.kl_control import KLController
from prefl.training.ppo_metrics import rollout_means, update_metrics
from prefl.training.ppo_rollout import (
    Estimator,
    Rollout,
    check_estimator,
    collect_rollout,
    offload,
    on_device,
    rollout_seed,
)
from prefl.training.ppo_update import PPOLoss, UpdateStats, ppo_update


class PPOModule(ReferenceModule):
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
        check_estimator(advantage_estimator, num_samples)
        check_reward_sources(reward_model, reward_fns, reward_weights)
        self.automatic_optimization = False
        self.reference = None
        # PPO learns from prompts and is evaluated by sampling (EvalCallback, SampleReport), not
        # by a validation loop; the data module defines val_dataloader for every module, so
        # Lightning's "val_dataloader but no validation_step" would be prefl's doing.
        warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no")
        # one typed attribute per argument (kl_coef, kl_target, kl_horizon: in the controller)
        self.reward_model_path: str | None = reward_model
        self.reward_fns: list[str] = list(reward_fns or [])
        self.reward_weights: list[float] | None = reward_weights
        self.normalize_reward: bool = normalize_reward
        self.reward_clip: float | None = reward_clip
        self.no_eos_score: float | None = no_eos_score
        self.value_model_path: str | None = value_model
        self.advantage_estimator: Estimator = advantage_estimator
        self.num_samples: int = num_samples
        self.temperature: float = temperature
        self.max_new_tokens: int = max_new_tokens
        self.kl_penalty: Literal["reward", "loss"] = kl_penalty
        self.gamma: float = gamma
        self.lam: float = lam
        self.whiten_advantages: bool = whiten_advantages
        self.ppo_epochs: int = ppo_epochs
        self.mini_batch_size: int | None = mini_batch_size
        self.micro_batch_size: int | None = micro_batch_size
        self.clip_eps: float = clip_eps
        self.value_clip_eps: float = value_clip_eps
        self.max_grad_norm: float | None = max_grad_norm
        self.value_optimizer_factory: OptimizerCallable = value_optimizer
        self.log_samples_every: int = log_samples_every
        self.seed: int = seed
        self.offload_frozen: bool = offload_frozen
        self.kl_ctl = KLController(kl_coef, kl_target, kl_horizon)
        self.scorer: Scorer | None = None
        self.value_model: torch.nn.Module | None = None
        self.update_steps = 0

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator is GAE (with the value model)."""
        return self.advantage_estimator == "gae"

    def build_models(self) -> None:
        """Build policy, reference, reward model(s) and, for GAE, the value model."""
        super().build_models()
        self.build_reference()
        tokenizer = self.resolve_tokenizer()
        self.scorer = build_scorer(
            self.reward_model_path,
            self.reward_fns,
            self.reward_weights,
            tokenizer,
            normalize=self.normalize_reward,
            no_eos_score=self.no_eos_score,
            clip=self.reward_clip,
        )
        if self.uses_critic:
            source = critic_spec(self.model_spec, self.value_model_path or self.reward_model_path)
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

    def offloadable_models(self) -> list[torch.nn.Module]:
        """The frozen models that ``offload_frozen`` keeps on the CPU between rollouts: the
        reference copy (none with LoRA) and the reward model."""
        reward = self.scorer.reward_model if self.scorer is not None else None
        return [m for m in (self.reference, reward) if m is not None]

    def offload_frozen_models(self) -> None:
        """Move :meth:`offloadable_models` to the CPU (when ``offload_frozen`` is set)."""
        if self.offload_frozen:
            offload(self.offloadable_models(), self.sharded)

    def on_train_start(self) -> None:
        """Offload the frozen models before the first rollout (Lightning moved them all)."""
        super().on_train_start()
        self.offload_frozen_models()

    def configure_optimizers(self) -> Any:
        """The policy optimizer and, for GAE, the value optimizer (its own learning rate)."""
        policy = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if not self.uses_critic:
            return policy
        critic = [p for p in self.value_model.parameters() if p.requires_grad]  # LoRA: adapters
        return [policy, self.value_optimizer_factory(critic)]

    def forward(self, responses: Responses) -> torch.Tensor:
        """Policy log-probs ``(N, R)`` of the responses (logits divided by the temperature)."""
        return response_logprobs(self.model, responses, self.temperature)[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One rollout and its PPO update; logs design §5.12's quantities."""
        seed = rollout_seed(self.seed, self.current_epoch, batch_idx, self.global_rank)
        rollout = self.rollout(batch, seed)
        stats = self.ppo_update(rollout, seed)
        means, n = rollout_means(rollout, self._sum_over_ranks)
        self._log_metrics(means, n, update_metrics(rollout, stats, self.kl_ctl.value))
        self.kl_ctl.update(float(means["ppo/kl"]), n)
        every = self.log_samples_every
        if every and batch_idx % every == 0:
            self._log_samples(rollout)

    def rollout(self, batch: dict[str, Any], seed: int) -> Rollout:
        """Sample, score and compute advantages for one batch of prompts (no gradients; with
        ``offload_frozen`` the frozen models visit the accelerator for it)."""
        frozen = self.offloadable_models() if self.offload_frozen else []
        with on_device(frozen, self.device):
            return collect_rollout(
                batch,
                seed,
                policy=self.model,
                reference=self.reference_context,
                scorer=self.scorer,
                value_model=self.value_model if self.uses_critic else None,
                tokenizer=self.resolve_tokenizer(),
                num_samples=self.num_samples,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
                kl_coef=self.kl_ctl.value if self.kl_penalty == "reward" else 0.0,
                estimator=self.advantage_estimator,
                gamma=self.gamma,
                lam=self.lam,
                whiten=self.whiten_advantages,
            )

    def ppo_update(self, rollout: Rollout, seed: int) -> UpdateStats:
        """``ppo_epochs`` passes of shuffled minibatches over ``rollout``, every optimizer
        stepping once per minibatch (:meth:`_step_optimizers`)."""
        loss_fn = PPOLoss(
            self.model,
            self.value_model if self.uses_critic else None,
            self.temperature,
            self.clip_eps,
            self.value_clip_eps,
            self.kl_ctl.value if self.kl_penalty == "loss" else None,
        )
        return ppo_update(
            rollout,
            seed,
            loss_fn,
            backward=self.manual_backward,
            step=self._step_optimizers,
            reduce=self._sum_over_ranks,
            world_size=self.trainer.world_size,
            ppo_epochs=self.ppo_epochs,
            mini_batch_size=self.mini_batch_size,
            micro_batch_size=self.micro_batch_size,
        )

    def _step_optimizers(self) -> None:
        """Clip the gradient norm (``max_grad_norm``), step and zero every optimizer once."""
        optimizers = self.optimizers()
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            if self.max_grad_norm is not None:
                self.clip_gradients(optimizer, self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.update_steps += 1

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the data-parallel ranks (a collective)."""
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def _log_metrics(
        self, means: dict[str, torch.Tensor], n: int, per_rank: dict[str, torch.Tensor]
    ) -> None:
        """Log the exact global ``means`` (over ``n`` real responses on all ranks) and the
        ``per_rank`` values averaged over ranks (``sync_dist``)."""
        log = {"on_step": True, "on_epoch": False, "batch_size": n, "prog_bar": False}
        self.log_dict({k: v.float() for k, v in means.items()}, **log)
        # on the module's device: NCCL has no CPU backend for the sync_dist all-reduce
        self.log_dict(
            {k: v.float().to(self.device) for k, v in per_rank.items()}, sync_dist=True, **log
        )
        self.log("ppo/score_step", means["ppo/score"], prog_bar=True, batch_size=n)

    def _log_samples(self, rollout: Rollout) -> None:
        """A markdown table of prompts, responses and scores to TensorBoard."""
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                table = rollout.markdown()
                logger.experiment.add_text("ppo/samples", table, self.update_steps)

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
