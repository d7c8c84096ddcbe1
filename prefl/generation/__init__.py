"""Generation: sampling from exactly ``softmax(logits / T)``, PPO rollouts, reward sources and
generation-based evaluation."""

from prefl.generation.evaluate import distinct_n, evaluate, win_rate
from prefl.generation.rewards import RewardFn, Scorer, resolve_reward_fn
from prefl.generation.rollout import Responses, response_logprobs, sample_responses
from prefl.generation.sample import (
    Samples,
    completion_mask,
    generate_sampled,
    sample_completions,
    sampling_config,
)

__all__ = [
    "RewardFn",
    "Responses",
    "Samples",
    "Scorer",
    "completion_mask",
    "distinct_n",
    "evaluate",
    "generate_sampled",
    "resolve_reward_fn",
    "response_logprobs",
    "sample_completions",
    "sample_responses",
    "sampling_config",
    "win_rate",
]
