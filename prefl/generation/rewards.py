"""Reward sources for sampled responses: reward functions by name, and the RL scorer.

:data:`RewardFn` is the one signature of a Python reward function, ``fn(prompts, completions) ->
list[float]``; :func:`resolve_reward_fn` finds one by name (``"toy"`` or
``"package.module:function"``) for PPO, evaluation and the callbacks alike.

:class:`Scorer` turns responses into one scalar score each (design §5.5–5.6): the frozen reward
model (read at the last real token; normalised with the mean/std stored in its export) and Python
reward functions ``fn(prompts, completions) -> list[float]``, each with a weight; then responses
that never emitted EOS get a fixed penalty score, and scores are optionally clipped.
:func:`build_scorer` makes one from a reward-model export path and reward-function names (as
PPO's settings give them), and :func:`check_reward_sources` rejects settings that cannot.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from prefl.generation.rollout import Responses
from prefl.models import disable_dropout
from prefl.models.reward import RewardModel
from prefl.tasks import toy

#: A reward function: prompts and completions (texts, same length) to one float each.
RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


def resolve_reward_fn(name: str) -> RewardFn:
    """``"toy"`` for the toy oracle, or ``"package.module:function"`` for your own function
    ``fn(prompts, completions) -> list[float]``."""
    if name == "toy":
        return toy.oracle_rewards
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"reward function {name!r}: expected 'toy' or 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


class Scorer(torch.nn.Module):
    """Weighted sum of a reward model's and reward functions' scores, with shaping.

    Args:
        reward_model: A frozen :class:`~prefl.models.RewardModel`, or None.
        reward_fns: Reward functions ``fn(prompts, completions) -> list[float]``.
        weights: One weight per source: the reward model first (if any), then the functions.
        normalize: Normalise the reward model's score with its stored mean/std.
        no_eos_score: Score given to responses without EOS instead of theirs; None = keep.
        clip: Clip the final score to ``[-clip, clip]``; None = no clipping.
        same_tokenizer: The reward model shares the policy's tokenizer, so it reads the sampled
            ids directly; otherwise it re-tokenizes the decoded texts.
    """

    def __init__(
        self,
        reward_model: RewardModel | None,
        reward_fns: Sequence[RewardFn],
        weights: Sequence[float],
        normalize: bool = True,
        no_eos_score: float | None = -1.0,
        clip: float | None = None,
        same_tokenizer: bool = True,
    ) -> None:
        super().__init__()
        n_sources = len(reward_fns) + (reward_model is not None)
        if n_sources == 0:
            raise ValueError("PPO needs a reward: set model.reward_model and/or model.reward_fns")
        if len(weights) != n_sources:
            raise ValueError(f"{len(weights)} reward weights for {n_sources} reward sources")
        self.reward_model, self.reward_fns = reward_model, list(reward_fns)
        self.weights, self.normalize = list(weights), normalize
        self.no_eos_score, self.clip, self.same_tokenizer = no_eos_score, clip, same_tokenizer

    @torch.no_grad()
    def forward(
        self, responses: Responses, prompts: Sequence[str], completions: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Scores ``(N,)``: ``score`` (shaped, used as the reward), ``raw`` (weighted sum before
        the EOS penalty and clipping) and one entry per source (``reward_model``, ``fn<i>``)."""
        device = responses.response_ids.device
        parts: dict[str, torch.Tensor] = {}
        if self.reward_model is not None:
            if self.same_tokenizer:
                ids, mask, _ = responses.sequence()
                rm = self.reward_model(ids, mask)
            else:
                rm = torch.tensor(self.reward_model.score(prompts, completions), device=device)
            parts["reward_model"] = self.reward_model.normalize(rm) if self.normalize else rm
        for i, fn in enumerate(self.reward_fns):
            values = fn(prompts, completions)
            parts[f"fn{i}"] = torch.tensor(values, dtype=torch.float32, device=device)
        raw = sum(w * v.float() for w, v in zip(self.weights, parts.values(), strict=True))
        score = raw.clone()
        if self.no_eos_score is not None:
            score = torch.where(responses.ended, score, torch.full_like(score, self.no_eos_score))
        if self.clip is not None:
            score = score.clamp(-self.clip, self.clip)
        return {"score": score, "raw": raw, **parts}


def check_reward_sources(
    reward_model: str | None,
    reward_fns: Sequence[str] | None,
    reward_weights: Sequence[float] | None,
) -> None:
    """Raise a ``ValueError`` naming the config keys unless there is a reward source and, when
    ``reward_weights`` is given, one weight per source (the reward model first)."""
    n_sources = len(reward_fns or []) + (reward_model is not None)
    if n_sources == 0:
        raise ValueError("PPO needs a reward: set model.reward_model and/or model.reward_fns")
    if reward_weights is not None and len(reward_weights) != n_sources:
        raise ValueError(
            f"model.reward_weights has {len(reward_weights)} values for "
            f"{n_sources} reward sources (reward model first, then functions)"
        )


def build_scorer(
    reward_model: str | None,
    reward_fns: Sequence[str],
    reward_weights: Sequence[float] | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    normalize: bool = True,
    no_eos_score: float | None = -1.0,
    clip: float | None = None,
) -> Scorer:
    """A :class:`Scorer` from settings.

    Args:
        reward_model: Path of a reward-model export, loaded frozen with dropout off; or None.
        reward_fns: Reward-function names (see :func:`resolve_reward_fn`).
        reward_weights: One weight per source (the reward model first); None = all 1.
        tokenizer: The policy's tokenizer: a reward model with the same vocabulary reads the
            sampled ids directly, another one re-tokenizes the texts.
        normalize: Normalise the reward model's score with its stored mean/std.
        no_eos_score: Score of responses that never emit EOS; None = no penalty.
        clip: Clip scores to ``[-clip, clip]``; None = no clipping.
    """
    model = None
    if reward_model is not None:
        model = RewardModel.from_pretrained(reward_model)
        for p in model.parameters():
            p.requires_grad_(False)
        disable_dropout(model)
    fns = [resolve_reward_fn(name) for name in reward_fns]
    weights = reward_weights or [1.0] * (len(fns) + (model is not None))
    same = model is None or model.tokenizer.get_vocab() == tokenizer.get_vocab()
    return Scorer(model, fns, weights, normalize, no_eos_score, clip, same)
