"""``prefl.training.ppo_update`` as plain functions: the token normaliser by hand, the loop's
counts of backwards, steps and reductions, its permutations, and :class:`PPOLoss` at ratio 1 on
the tiny random toy model. (``tests/modules/test_ppo.py`` checks the update through
``PPOModule``: step counts, micro-batch invariance, every flag.)"""

from __future__ import annotations

import math

import pytest
import torch

from prefl.generation.rollout import response_logprobs, sample_responses
from prefl.training.ppo_rollout import Rollout
from prefl.training.ppo_update import PPOLoss, UpdateStats, ppo_update, token_norm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_token_norm_by_hand():
    """5 valid tokens on each of 2 ranks (a reduction that doubles), world size 2: 10 / 2 = 5;
    no valid token at all is clamped to 1."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert token_norm(mask, lambda t: 2 * t, 2).item() == 5.0
    assert token_norm(mask, lambda t: t, 1).item() == 5.0
    assert token_norm(torch.zeros(2, 3), lambda t: t, 1).item() == 1.0


def rollout_of(responses, logprobs, mask, advantages):
    """A rollout around sampled ``responses`` (no critic; KL, rewards, scores unused here)."""
    zeros = torch.zeros_like(logprobs)
    n = len(mask)
    return Rollout(
        responses=responses,
        mask=mask,
        weights=torch.ones(n),
        logprobs=logprobs,
        ref_logprobs=logprobs.clone(),
        kl=zeros,
        rewards=zeros,
        advantages=advantages,
        values=None,
        returns=None,
        scores={"score": torch.zeros(n)},
        prompts=[""] * n,
        completions=[""] * n,
    )


def run_loop(r, seed, events):
    """Run :func:`ppo_update` over ``r`` (5 rows) with a stub loss, recording every call in
    ``events``; returns the stats and the rows of each micro-batch."""
    seen = []

    def loss_fn(rollout, index, norm):
        seen.append(index.tolist())
        events.append("loss")
        stat = torch.tensor(float(len(index)))
        names = ("policy_loss", "clip_frac", "approx_kl", "entropy")
        return torch.tensor(0.0), {name: stat / norm for name in names}

    def reduce(t):
        events.append("reduce")
        return t

    stats = ppo_update(
        r,
        seed,
        loss_fn,
        backward=lambda loss: events.append("backward"),
        step=lambda: events.append("step"),
        reduce=reduce,
        world_size=1,
        ppo_epochs=2,
        mini_batch_size=2,
        micro_batch_size=1,
    )
    return stats, seen


def test_update_loop_counts_and_permutations():
    """N = 5 rows, minibatches of 2, micro-batches of 1, 2 epochs: ceil(5/2) = 3 steps and 3
    reductions an epoch, one backward per row right after its loss; each epoch visits every row
    once, in an order the seed alone decides. The statistics are the minibatch sums averaged
    over the 6 steps: minibatches of 2, 2 and 1 rows (normaliser = their token count, 4, 4 and
    2) give (2/4 + 2/4 + 1/2) / 3 = 1/2 each."""
    r = rollout_of(None, torch.zeros(5, 2), torch.ones(5, 2), torch.zeros(5, 2))
    events = []
    stats, seen = run_loop(r, 7, events)
    assert events.count("step") == 2 * math.ceil(5 / 2) and events.count("reduce") == 6
    assert events.count("loss") == events.count("backward") == 2 * 5
    assert events[:7] == ["reduce", "loss", "backward", "loss", "backward", "step", "reduce"]
    rows = [i for index in seen for i in index]
    assert sorted(rows[:5]) == sorted(rows[5:]) == list(range(5))
    assert run_loop(r, 7, [])[1] == seen
    assert run_loop(r, 8, [])[1] != seen
    names = ["policy_loss", "clip_frac", "approx_kl", "entropy"]
    assert list(stats.as_dict()) == names
    assert stats.as_dict() == pytest.approx(dict.fromkeys(names, 0.5))
    assert stats.value_loss is None and stats.value_clip_frac is None


def test_ppo_loss_at_ratio_one(model, tok):
    """With the rollout's own log-probs the ratio is 1: no clipping, approx-KL 0, and the policy
    loss over a token normaliser ``n`` is ``Σ -A · mask / n``; the k3 term is 0 (reference ==
    old policy) and the statistics have no value entries without a critic."""
    prompt = tok(["happily , the plot was"])["input_ids"]
    ids = torch.tensor(prompt)
    responses = sample_responses(
        model,
        ids,
        torch.ones_like(ids),
        k=3,
        temperature=1.0,
        max_new_tokens=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        seed=0,
    )
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, responses, 1.0)
    mask = responses.response_mask.float()
    advantages = torch.linspace(-1, 1, mask.numel()).view_as(mask) * mask
    r = rollout_of(responses, logprobs, mask, advantages)
    index, norm = torch.tensor([2, 0]), torch.tensor(5.0)
    loss_fn = PPOLoss(model, None, 1.0, 0.2, 0.2, kl_coef=0.5)
    loss, stats = loss_fn(r, index, norm)
    expected = (-advantages[index] * mask[index]).sum() / norm
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert list(stats) == ["policy_loss", "clip_frac", "approx_kl", "entropy"]
    assert stats["clip_frac"].item() == 0.0 and abs(stats["approx_kl"].item()) < 1e-10
    assert stats["entropy"].item() > 0
    assert UpdateStats(**{k: float(v) for k, v in stats.items()}).value_clip_frac is None
