"""PPO's rollout (design §5.1–5.7) as a plain function: :func:`collect_rollout` samples ``k``
responses per prompt, scores them, and turns them into per-token KL, rewards and advantages, all
without gradients, returning one typed :class:`Rollout`.

It takes what it uses as arguments (policy, reference, scorer, critic, settings), so
:class:`~prefl.modules.ppo.PPOModule` calls it once per training step. Beside it:
:func:`compute_advantages` (GAE with the critic, or a critic-free estimator over each prompt's
group, then optional whitening over every rank), :func:`check_estimator`, :func:`rollout_seed`
(the sampling seed of a rollout), :func:`offload` and :func:`on_device` (with ``offload_frozen``,
the frozen models visit the accelerator only for the rollout, the PPO analogue of
``precompute_ref_logps``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from prefl.functional import gae, global_whiten
from prefl.functional.advantages import ADVANTAGE_ESTIMATORS
from prefl.generation.rewards import Scorer
from prefl.generation.rollout import (
    Responses,
    response_logprobs,
    response_values,
    sample_responses,
    token_rewards,
)

#: The advantage estimators: GAE (with the critic) and the critic-free ones.
Estimator = Literal["gae", "rloo", "grpo", "reinforce_baseline"]


@dataclass
class Rollout:
    """One rollout: ``N = prompts × k`` responses (``repeat_interleave`` order, so the ``k``
    responses of a prompt are adjacent) of at most ``R`` tokens.

    Masks are float, 1 = counts. ``kl``, ``advantages`` and ``returns`` are 0 wherever ``mask``
    is 0, and so are ``rewards`` except that a padding repeat's row (all-0 ``mask``) holds its
    score on its first token (it weighs 0 everywhere); ``logprobs``, ``ref_logprobs`` and
    ``values`` are 0 on padding (where ``responses.response_mask`` is 0).

    Attributes:
        responses: The sampled responses (ids and masks; see
            :class:`~prefl.generation.rollout.Responses`).
        mask: ``(N, R)`` float: 1 on the response tokens (up to and including the first EOS)
            of real rows; 0 on padding and on every token of a data-parallel padding repeat.
            Losses and token statistics are means over it.
        weights: ``(N,)`` float: 1 for a real row, 0 for a data-parallel padding repeat.
        logprobs: ``(N, R)`` the policy's per-token log-probs at sampling time (the old
            log-probs of the PPO ratio), logits divided by the temperature.
        ref_logprobs: ``(N, R)`` the reference's per-token log-probs, likewise.
        kl: ``(N, R)`` per-token k1 KL estimate ``(logprobs - ref_logprobs) · mask``; row sums
            are the sequence KL.
        rewards: ``(N, R)`` per-token rewards: ``-β · kl`` (β = 0 when the KL is in the loss)
            plus the score on each row's last valid token.
        advantages: ``(N, R)`` advantages (whitened over every rank if asked).
        values: ``(N, R)`` the critic's values at sampling time; None without a critic.
        returns: ``(N, R)`` GAE returns (advantages before whitening + values); None without a
            critic.
        scores: name -> ``(N,)``: ``score`` (shaped; the reward), ``raw`` and one per source
            (``reward_model``, ``fn<i>``), as :class:`~prefl.generation.rewards.Scorer` gives.
        prompts: The ``N`` prompt texts (each repeated ``k`` times).
        completions: The ``N`` decoded responses (special tokens skipped).
    """

    responses: Responses
    mask: Tensor
    weights: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    kl: Tensor
    rewards: Tensor
    advantages: Tensor
    values: Tensor | None
    returns: Tensor | None
    scores: dict[str, Tensor]
    prompts: list[str]
    completions: list[str]

    def markdown(self, rows: int = 8) -> str:
        """A markdown table of the first ``rows`` prompts, responses and scores."""
        lines = ["| prompt | response | score |", "|---|---|---|"]
        scores = self.scores["score"].tolist()
        for prompt, completion, score in list(
            zip(self.prompts, self.completions, scores, strict=True)
        )[:rows]:
            clean = [t.replace("|", "\\|").replace("\n", " ") for t in (prompt, completion)]
            lines.append(f"| {clean[0]} | {clean[1]} | {score:+.3f} |")
        return "\n".join(lines)


def check_estimator(estimator: str, num_samples: int) -> None:
    """Raise a ``ValueError`` naming the config key for an unknown estimator, or for ``rloo`` /
    ``grpo`` with fewer than 2 samples per prompt."""
    if estimator != "gae" and estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"model.advantage_estimator={estimator!r}; expected gae "
            f"or one of {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    if estimator in ("rloo", "grpo") and num_samples < 2:
        raise ValueError(f"model.num_samples must be >= 2 for {estimator}")


def rollout_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The sampling seed of a rollout: a function of (run seed, epoch, batch, rank), so ranks
    differ and a resumed run samples what the uninterrupted one would have (design §5.11)."""
    key = (seed * 1_000_003 + epoch) * 1_000_003 + batch_idx
    return (key * 1009 + rank) % (2**63)


def offload(models: Sequence[torch.nn.Module], sharded: bool = False) -> None:
    """Move ``models`` to the CPU (``offload_frozen``); sharded models cannot be (each rank
    holds a shard already): a ``ValueError`` naming the config key."""
    if sharded:
        raise ValueError(
            "model.offload_frozen does not combine with a sharded strategy: the frozen "
            "models are already sharded over the ranks"
        )
    for model in models:
        model.to("cpu")


@contextlib.contextmanager
def on_device(models: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """``models`` on ``device`` for the block, and on the CPU after it (also on error); with no
    models, nothing moves."""
    for model in models:
        model.to(device)
    try:
        yield
    finally:
        for model in models:
            model.to("cpu")


def compute_advantages(
    rewards: Tensor,
    mask: Tensor,
    values: Tensor | None,
    *,
    estimator: Estimator,
    k: int,
    gamma: float,
    lam: float,
    whiten: bool,
) -> tuple[Tensor, Tensor | None]:
    """Advantages of a rollout: GAE over the critic's values, or a critic-free estimator over
    each prompt's ``k`` responses (one value per response, spread over its tokens).

    Args:
        rewards: ``(N, R)`` per-token rewards, 0 on padding.
        mask: ``(N, R)`` float, 1 on the valid tokens of real rows.
        values: ``(N, R)`` critic values (``gae`` only; None otherwise).
        estimator: ``gae`` or a name in :data:`~prefl.functional.advantages.ADVANTAGE_ESTIMATORS`.
        k: Responses per prompt (adjacent rows).
        gamma: GAE discount γ.
        lam: GAE λ.
        whiten: Whiten the advantages over the valid tokens of every data-parallel rank (a
            collective when ``torch.distributed`` is initialised).

    Returns:
        ``(advantages, returns)``, ``(N, R)`` each, 0 where ``mask`` is 0; ``returns`` (from the
        advantages before whitening) is None for the critic-free estimators.
    """
    returns = None
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage_estimator='gae' needs the critic's values")
        advantages, returns = gae(rewards, values, mask, gamma, lam)
    else:
        advantages = ADVANTAGE_ESTIMATORS[estimator](rewards.sum(-1), k)[:, None] * mask
    if whiten:
        advantages = global_whiten(advantages, mask)  # over every rank's rollout
    return advantages, returns


@torch.no_grad()
def collect_rollout(
    batch: Mapping[str, Any],
    seed: int,
    *,
    policy: torch.nn.Module,
    reference: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]],
    scorer: Scorer,
    value_model: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    kl_coef: float,
    estimator: Estimator,
    gamma: float,
    lam: float,
    whiten: bool,
) -> Rollout:
    """Sample, score and compute advantages for one batch of prompts (no gradients).

    Args:
        batch: A ``prompts`` batch: ``prompt_input_ids`` / ``prompt_attention_mask`` ``(B, P)``
            left-padded, ``prompt`` (B texts) and optionally ``sample_weight`` ``(B,)`` (0 for
            data-parallel padding repeats).
        seed: The sampling seed (:func:`rollout_seed`).
        policy: The policy; samples and gives the old log-probs.
        reference: Opens a context that yields the frozen reference model.
        scorer: Scores the responses.
        value_model: The critic (``gae``); None for the critic-free estimators.
        tokenizer: Gives PAD and EOS ids and decodes the responses.
        num_samples: Responses per prompt (``k``).
        temperature: Sampling temperature; every log-prob divides the logits by it.
        max_new_tokens: Most tokens per response.
        kl_coef: β of the per-token KL in the rewards (0 = the KL is not in the rewards).
        estimator: The advantage estimator (see :func:`compute_advantages`).
        gamma: GAE discount γ.
        lam: GAE λ.
        whiten: Whiten the advantages over every rank's valid tokens.

    Returns:
        The :class:`Rollout` of ``N = B × num_samples`` responses.
    """
    k = num_samples
    responses, weights, mask = _sample(
        batch, seed, policy, tokenizer, k, temperature, max_new_tokens
    )
    logprobs, _ = response_logprobs(policy, responses, temperature)
    with reference() as ref:
        ref_logprobs, _ = response_logprobs(ref, responses, temperature)
    prompts = [p for p in batch["prompt"] for _ in range(k)]
    completions = tokenizer.batch_decode(responses.response_ids, skip_special_tokens=True)
    scores = scorer(responses, prompts, completions)
    kl = (logprobs - ref_logprobs) * mask  # k1 per token: the sequence KL estimate
    rewards = token_rewards(scores["score"], kl, mask, kl_coef)
    values = None if value_model is None else response_values(value_model, responses)
    advantages, returns = compute_advantages(
        rewards, mask, values, estimator=estimator, k=k, gamma=gamma, lam=lam, whiten=whiten
    )
    return Rollout(
        responses=responses,
        mask=mask,
        weights=weights,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        values=values,
        returns=returns,
        scores=scores,
        prompts=prompts,
        completions=completions,
    )


def _sample(
    batch: Mapping[str, Any],
    seed: int,
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    k: int,
    temperature: float,
    max_new_tokens: int,
) -> tuple[Responses, Tensor, Tensor]:
    """The responses, row weights ``(N,)`` and loss mask ``(N, R)`` of :func:`collect_rollout`."""
    responses = sample_responses(
        policy,
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
    )
    weights = batch.get("sample_weight")  # data-parallel padding repeats weigh 0
    weights = torch.ones(len(batch["prompt"])) if weights is None else weights
    weights = weights.to(responses.response_mask.device).repeat_interleave(k)
    mask = responses.response_mask.float() * weights[:, None]  # repeats: no loss, no stats
    return responses, weights, mask
