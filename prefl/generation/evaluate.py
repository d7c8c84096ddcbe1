"""Generation-based evaluation of a policy against its reference (usable from Python, the CLI
pipeline and, through :class:`prefl.callbacks.EvalCallback`, during training).

For held-out prompts, :func:`evaluate` samples ``num_samples`` completions per prompt from the
policy and from the reference (same prompts, same seed), and reports:

- ``reward``: mean reward of the policy's samples (an oracle where there is one, else a reward
  model's ``score``), and ``reference_reward`` for the reference's;
- ``kl``: sequence-level KL(policy ‖ reference), estimated on the policy's own samples as the mean
  of ``log π(y|x) − log π_ref(y|x)`` (log-probs at temperature 1);
- ``win_rate``: share of prompts-and-sample-slots where the policy's sample beats the reference's
  under the reward (ties count one half);
- ``eos_rate``, ``mean_length`` (tokens) and ``distinct_1`` / ``distinct_2`` (unique n-grams over
  all n-grams of the policy's samples, a diversity measure).

Both models sample from exactly ``softmax(logits / temperature)``
(:func:`prefl.generation.sample_completions`): the checkpoints' ``generation_config`` settings
(top-k / top-p, repetition penalty, minimum length, suppressed tokens...) are not applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from prefl.generation.rewards import RewardFn
from prefl.generation.sample import Samples, sample_completions, score_samples


def distinct_n(completions: Sequence[str], n: int) -> float:
    """Unique word n-grams over all word n-grams of ``completions`` (0 when there are none)."""
    grams = [
        tuple(w[i : i + n]) for w in (c.split() for c in completions) for i in range(len(w) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(rewards: Sequence[float], reference_rewards: Sequence[float]) -> float:
    """Share of pairs where ``rewards[i] > reference_rewards[i]``, ties counting one half."""
    pairs = list(zip(rewards, reference_rewards, strict=True))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def evaluate(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    num_samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 128,
    reference_samples: Samples | None = None,
) -> dict[str, float]:
    """Evaluate ``policy`` against ``reference`` on ``prompts`` (see the module docstring).

    Args:
        policy: The tuned causal LM.
        reference: The model it is compared with (e.g. the SFT model).
        tokenizer: Their tokenizer.
        prompts: Held-out prompt texts.
        reward_fn: ``fn(prompts, completions) -> list[float]`` (an oracle, or a reward model's
            ``score``).
        num_samples: Completions per prompt.
        temperature: Sampling temperature: samples come from ``softmax(logits / temperature)``,
            no other processor, whatever the checkpoints' generation configs say.
        max_new_tokens: Most tokens per completion.
        seed: Sampling seed (the same for policy and reference).
        batch_size: Prompts per ``generate`` call.
        reference_samples: The reference's samples, if already drawn (saves sampling again).
    """

    def draw(model: torch.nn.Module) -> Samples:
        return sample_completions(
            model, tokenizer, prompts, max_new_tokens, temperature, num_samples, batch_size, seed
        )

    samples = draw(policy)
    ref_samples = reference_samples if reference_samples is not None else draw(reference)
    rewards = reward_fn(samples.prompts, samples.completions)
    ref_rewards = reward_fn(ref_samples.prompts, ref_samples.completions)
    pad = tokenizer.pad_token_id
    kl = score_samples(policy, samples, pad, batch_size) - score_samples(
        reference, samples, pad, batch_size
    )
    n = len(rewards)
    return {
        "reward": sum(rewards) / n,
        "reference_reward": sum(ref_rewards) / n,
        "kl": kl.mean().item(),
        "win_rate": win_rate(rewards, ref_rewards),
        "eos_rate": sum(samples.ended) / n,
        "mean_length": sum(samples.lengths) / n,
        "distinct_1": distinct_n(samples.completions, 1),
        "distinct_2": distinct_n(samples.completions, 2),
    }
