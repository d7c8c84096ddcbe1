"""OnlineDPOModule: DPO on pairs of the policy's own samples, labelled as it trains.

Offline DPO learns from pairs sampled once from the SFT model; as the policy moves away from them
its gradient signal is off-policy. Online DPO (Guo et al. 2024, arXiv:2402.04792) labels fresh
pairs at every step: for each prompt of a ``prompts`` batch it samples ``num_samples`` (k >= 2)
completions from the current policy with PPO's sampling (exactly ``softmax(logits / T)``, the KV
cache, a seed per (run, epoch, batch, rank) so that a resumed run samples the same), scores them
with PPO's :class:`~prefl.generation.rewards.Scorer` (a reward-model export, reward functions,
weights, the EOS penalty), and pairs the best against the worst; a prompt whose samples all score
the same is a tie, skipped (weight 0) and counted. The pairs then go through
:class:`~prefl.modules.dpo.DPOModule`'s loss, any of the DPO family, against the frozen
reference (with LoRA: the policy with its adapters disabled).

It is a module of its own, not a mode of ``DPOModule``, because its data is different (``prompts``
batches, not pairs) and so is what it holds (a scorer). Validation samples the validation
prompts the same way (another seed) and logs the DPO metrics of their pairs. Metrics, besides
DPO's: ``online/score`` (mean score of every sample), ``online/kl`` (sequence KL(policy ‖
reference) of the samples, k1 at temperature 1), ``online/eos_rate`` and ``online/ties`` (share
of prompts skipped), per stage, exact over data-parallel ranks (padding repeats weigh 0).

**Iterative DPO** (``round_size``): the samples of a round of steps come from the policy as it
was at the round's start, and ``ref_sync_every`` (with ``ref_mixup_alpha`` 1) moves the reference
to the policy at each round's end: rounds of (sample on-policy pairs → train on them → move the
reference), configured in YAML.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from transformers import PreTrainedTokenizerBase

from prefl.data.collate import PreferenceCollator
from prefl.generation.rewards import Scorer, build_scorer, check_reward_sources
from prefl.generation.rollout import Responses, response_logprobs, sample_responses
from prefl.models import CausalLMSpec
from prefl.modules.dpo import DPOModule
from prefl.training.metrics import StageMetrics
from prefl.training.ppo_rollout import rollout_seed
from prefl.training.schedules import WarmupCosineLR

ONLINE_METRICS = ("online/score", "online/kl", "online/eos_rate", "online/ties")


def best_and_worst(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt (``scores`` ``(B·k,)`` in ``repeat_interleave`` order): the flat index of its
    best and of its worst sample ``(B,)``, and whether it is a tie ``(B,)`` (best == worst
    score). The first of equal samples is taken."""
    grouped = scores.view(-1, k)
    offset = torch.arange(grouped.shape[0], device=scores.device) * k
    best, worst = grouped.argmax(-1), grouped.argmin(-1)
    tie = grouped.max(-1).values == grouped.min(-1).values
    return offset + best, offset + worst, tie


class OnlineDPOModule(DPOModule):
    """Online DPO of a causal LM on ``prompts`` batches (see the module docstring).

    Args:
        model: The policy: a :class:`~prefl.models.CausalLMSpec` or a hub id / local path.
        tokenizer: The tokenizer; None = the data module's (the CLI links them).
        reward_model: Path of a reward-model export scoring the samples; None = functions only.
        reward_fns: Reward functions (``"toy"`` or ``"package.module:function"``).
        reward_weights: One weight per source, the reward model first; None = all 1.
        normalize_reward: Normalise the reward model's score with its stored mean/std.
        no_eos_score: Score of a sample that never emits EOS; None = keep its score.
        num_samples: Completions per prompt (k >= 2); the best and the worst make the pair.
        temperature: Sampling temperature (> 0).
        max_new_tokens: Most tokens per completion.
        seed: Sampling seed of the run (each step's seed derives from it).
        round_size: Iterative DPO: sample every round of this many optimizer steps from a
            frozen copy of the policy as it was at the round's start (with ``ref_sync_every``
            set to the same number, the reference then moves to the policy at each round's
            end, as in RLHFlow's iterative DPO); None = online, each step samples the policy
            as it is.
        beta: DPO's β.
        loss_type: A DPO loss name, or a list of them (a mixture; see ``DPOModule``).
        loss_weights: Weights of a mixture's losses.
        label_smoothing: Assumed label-noise rate ε (cDPO and the losses that use it).
        ref_sync_every: Every this many optimizer steps move the reference towards the policy
            (``ref = α·policy + (1 − α)·ref``; α = 1 makes it the policy: iterative DPO's rounds);
            None = never.
        ref_mixup_alpha: α of each sync.
        optimizer: Builds the optimizer from the trainable parameters.
        lr_scheduler: Builds the scheduler; default linear warmup (10%) then cosine decay.
        max_nonfinite_steps: Consecutive non-finite steps skipped before the run stops.
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        reward_model: str | None = None,
        reward_fns: list[str] | None = None,
        reward_weights: list[float] | None = None,
        normalize_reward: bool = True,
        no_eos_score: float | None = -1.0,
        num_samples: int = 4,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        seed: int = 0,
        round_size: int | None = None,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        ref_sync_every: int | None = None,
        ref_mixup_alpha: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            beta=beta,
            loss_type=loss_type,
            loss_weights=loss_weights,
            label_smoothing=label_smoothing,
            ref_sync_every=ref_sync_every,
            ref_mixup_alpha=ref_mixup_alpha,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            max_nonfinite_steps=max_nonfinite_steps,
        )
        if num_samples < 2:
            raise ValueError(f"model.num_samples must be >= 2 (a pair), got {num_samples}")
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        check_reward_sources(reward_model, reward_fns, reward_weights)
        self.reward_model_path, self.reward_fns = reward_model, list(reward_fns or [])
        self.reward_weights, self.normalize_reward = reward_weights, normalize_reward
        self.no_eos_score = no_eos_score
        self.num_samples, self.temperature = num_samples, temperature
        self.max_new_tokens, self.seed = max_new_tokens, seed
        if round_size is not None and round_size < 1:
            raise ValueError(f"model.round_size must be >= 1 or None, got {round_size}")
        self.round_size = round_size
        self.round_policy: torch.nn.Module | None = None
        self._round_end = 0
        self.scorer: Scorer | None = None
        self.online_metrics = StageMetrics(ONLINE_METRICS)

    def build_models(self) -> None:
        """The policy, its reference and the scorer (a frozen reward model, if any)."""
        super().build_models()
        self.scorer = build_scorer(
            self.reward_model_path,
            self.reward_fns,
            self.reward_weights,
            self.resolve_tokenizer(),
            normalize=self.normalize_reward,
            no_eos_score=self.no_eos_score,
        )

    def shardable_models(self) -> list[torch.nn.Module]:
        """Policy, reference and reward model: each its own FSDP2 root."""
        reward = self.scorer.reward_model if self.scorer is not None else None
        return [*super().shardable_models(), *([reward] if reward is not None else [])]

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The reference and the reward model stay out of checkpoints (rebuilt from paths)."""
        frozen = super().frozen_modules()
        if not self.sharded and self.scorer is not None and self.scorer.reward_model is not None:
            frozen["scorer.reward_model"] = self.scorer.reward_model
        return frozen

    @torch.no_grad()
    def sample_pairs(
        self, batch: dict[str, Any], seed: int
    ) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Sample, score and pair (see the module docstring).

        Returns:
            A ``pairs`` batch on the module's device (``sample_weight`` 0 on ties and on
            data-parallel padding repeats), and the samples' statistics as ``name -> (values,
            weights)``: ``online/score``, ``online/kl`` and ``online/eos_rate`` per sample,
            ``online/ties`` per prompt (padding repeats weigh 0).
        """
        tokenizer = self.resolve_tokenizer()
        k = self.num_samples
        responses = sample_responses(
            self.sampler_policy(),
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            k=k,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            seed=seed,
        )
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        completions = tokenizer.batch_decode(responses.response_ids, skip_special_tokens=True)
        scores = self.scorer(responses, prompts, completions)["score"].float()
        best, worst, tie = best_and_worst(scores, k)
        pairs = self._collate(batch, responses, best, worst, tokenizer.pad_token_id)
        weights = batch.get("sample_weight", torch.ones_like(scores[::k])).to(scores)
        pairs["sample_weight"] = weights * (~tie).to(scores)
        per_sample = weights.repeat_interleave(k)
        stats = {
            "online/score": (scores, per_sample),
            "online/kl": (self._sample_kl(responses), per_sample),
            "online/eos_rate": (responses.ended.float(), per_sample),
            "online/ties": (tie.float(), weights),
        }
        return pairs, stats

    def _collate(
        self, batch: dict, responses: Responses, best: torch.Tensor, worst: torch.Tensor, pad: int
    ) -> dict[str, torch.Tensor]:
        """The pairs (prompt without its left padding, best and worst responses up to their
        first EOS) as a padded ``pairs`` batch on the module's device."""
        examples = []
        for b, (i, j) in enumerate(zip(best.tolist(), worst.tolist(), strict=True)):
            prompt = batch["prompt_input_ids"][b][batch["prompt_attention_mask"][b].bool()]
            chosen = responses.response_ids[i][responses.response_mask[i].bool()]
            rejected = responses.response_ids[j][responses.response_mask[j].bool()]
            examples.append(
                {
                    "prompt_ids": prompt.tolist(),
                    "chosen_ids": chosen.tolist(),
                    "rejected_ids": rejected.tolist(),
                }
            )
        collated = PreferenceCollator(pad, "pairs")(examples)
        return {key: value.to(self.device) for key, value in collated.items()}

    def _sample_kl(self, responses: Responses) -> torch.Tensor:
        """Sequence KL(policy ‖ reference) ``(N,)`` of the samples (k1, temperature 1)."""
        policy, _ = response_logprobs(self.model, responses, 1.0)
        with self.reference_context() as reference:
            ref, _ = response_logprobs(reference, responses, 1.0)
        return ((policy - ref) * responses.response_mask.to(policy.dtype)).sum(-1).float()

    def sampler_policy(self) -> torch.nn.Module:
        """The model that samples: the policy itself, or (``round_size``) its frozen copy from
        the start of the current round."""
        if self.round_size is None:
            return self.model
        if self.round_policy is None or self.global_step >= self._round_end:
            self.round_policy = copy.deepcopy(self.model).eval().requires_grad_(False)
            self._round_end = self.global_step + self.round_size
        return self.round_policy

    def _online_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> torch.Tensor:
        salt = 0 if stage == "train" else 7_919  # validation samples apart from training's
        seed = rollout_seed(self.seed + salt, self.current_epoch, batch_idx, self.global_rank)
        pairs, stats = self.sample_pairs(batch, seed)
        loss = self._step(pairs, stage)
        for name, (value, weight) in stats.items():  # exact over ranks: weighted, per name
            self.online_metrics.update(stage, {name: value}, weight)
        rows = len(batch["prompt"])
        self.online_metrics.log(self, stage, on_step=stage == "train", batch_size=rows)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Sample and pair on the current policy, then the DPO loss of those pairs."""
        return self._online_step(batch, batch_idx, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The DPO metrics of pairs sampled from the validation prompts."""
        self._online_step(batch, batch_idx, "val")
