"""The exact KL-regularised optimum of the toy task, and two end-to-end checks against it.

Unit tests derive ``reward_distribution``, ``best_of_n``, ``entropy_per_token`` and the optimum's
limits by hand; the Monte Carlo estimate must agree with the exact enumeration within its error.
End to end (slow): the toy SFT model's held-out NLL per token is within 1% of the generator's on
the same rows, and PPO with the oracle reward and a fixed β = 0.1 paid in the reward
(``configs/toy/ppo_optimum.yaml``) lands within 0.05 of ``R*(0.1)`` and within 30% of
``KL*(0.1)`` — the strongest end-to-end check of the RL path a CPU can run.
"""

from __future__ import annotations

import math

import pytest

from prefl.tasks import toy
from prefl.tasks.toy_optimum import (
    best_of_n,
    entropy_per_token,
    frontier_reward_at,
    optimal_frontier,
    reward_distribution,
)

POSITIVE_PROMPT = "happily , the film was"


def test_reward_distribution_hand_case():
    dist = reward_distribution("positive")
    assert sum(dist.values()) == pytest.approx(1.0, abs=1e-12)
    # r = 1: every word positive; P = mean over L = 3..10 of 0.5^L
    assert dist[1.0] == pytest.approx(sum(0.5**n for n in range(3, 11)) / 8, abs=1e-12)
    # mean reward: E[(pos - neg) / L] = p_pos - p_neg = 0.5 - 0.1 for every length
    assert sum(r * p for r, p in dist.items()) == pytest.approx(0.4, abs=1e-12)


def test_frontier_limits():
    """β → ∞: the reference itself (mean reward, KL 0); β → 0: the best reward, 1 (all words
    positive), at a KL of -log P(r = 1) averaged over prompts."""
    prompts = [POSITIVE_PROMPT]
    wide, narrow = optimal_frontier([1e6, 1e-3], prompts)
    assert wide["reward"] == pytest.approx(0.4, abs=1e-5)
    assert wide["kl"] == pytest.approx(0.0, abs=1e-5)
    assert narrow["reward"] == pytest.approx(1.0, abs=1e-6)
    assert narrow["kl"] == pytest.approx(-math.log(reward_distribution("positive")[1.0]), abs=1e-4)


def test_frontier_is_monotone_and_kl_matches_its_definition():
    points = optimal_frontier([2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    rewards, kls = [p["reward"] for p in points], [p["kl"] for p in points]
    assert rewards == sorted(rewards) and kls == sorted(kls)
    # KL* = R*/β − log E[e^{r/β}], for one prompt mood by direct sums
    dist, beta = reward_distribution("negative"), 0.2
    z = sum(p * math.exp(r / beta) for r, p in dist.items())
    r_star = sum(p * r * math.exp(r / beta) for r, p in dist.items()) / z
    (point,) = optimal_frontier([beta], ["sadly , the plot was"])
    assert point["reward"] == pytest.approx(r_star, abs=1e-12)
    assert point["kl"] == pytest.approx(r_star / beta - math.log(z), abs=1e-10)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_monte_carlo_agrees_with_the_exact_curve(beta):
    (exact,) = optimal_frontier([beta])
    (mc,) = optimal_frontier([beta], n_samples=20000, seed=1)
    assert exact["reward_se"] == exact["kl_se"] == 0.0
    assert 0 < mc["reward_se"] < 0.01 and 0 < mc["kl_se"] < 0.01
    assert abs(mc["reward"] - exact["reward"]) < 4 * mc["reward_se"]
    assert abs(mc["kl"] - exact["kl"]) < 4 * mc["kl_se"]


def test_best_of_n_hand_cases():
    one, two = best_of_n([1, 2], [POSITIVE_PROMPT])
    assert one == {"n": 1, "reward": pytest.approx(0.4, abs=1e-12), "kl": 0.0}
    dist = sorted(reward_distribution("positive").items())
    cdf, expected = 0.0, 0.0  # E[max of 2] = Σ v (F(v)² − F(v⁻)²)
    for value, prob in dist:
        expected += value * ((cdf + prob) ** 2 - cdf**2)
        cdf += prob
    assert two["reward"] == pytest.approx(expected, abs=1e-12)
    assert two["kl"] == pytest.approx(math.log(2) - 0.5, abs=1e-12)
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n([0])


def test_entropy_per_token_hand_case():
    # positive mood: word entropy −Σ p log(p / |category|), length uniform over 8 values, EOS
    word = -(0.5 * math.log(0.5 / 10) + 0.1 * math.log(0.1 / 12) + 0.4 * math.log(0.4 / 18))
    expected = (math.log(8) + 6.5 * word) / 7.5
    assert entropy_per_token([POSITIVE_PROMPT]) == pytest.approx(expected, abs=1e-12)


def test_entropy_matches_the_generators_own_samples():
    import random

    rng, prompts = random.Random(0), toy.split_prompts()[1]
    total, tokens = 0.0, 0
    for i in range(20000):
        prompt = prompts[i % len(prompts)]
        completion = toy.sample_completion(prompt, rng)
        total -= toy.generator_logprob(prompt, completion)
        tokens += len(completion.split()) + 1
    assert total / tokens == pytest.approx(entropy_per_token(), rel=0.005)


def test_frontier_reward_at_interpolates_and_clamps():
    frontier = [{"kl": 0.0, "reward": 0.1}, {"kl": 2.0, "reward": 0.5}, {"kl": 4.0, "reward": 0.9}]
    assert frontier_reward_at(1.0, frontier) == pytest.approx(0.3)
    assert frontier_reward_at(3.0, frontier) == pytest.approx(0.7)
    assert frontier_reward_at(-0.5, frontier) == 0.1
    assert frontier_reward_at(9.0, frontier) == 0.9


def test_bad_betas_are_refused():
    with pytest.raises(ValueError, match="betas must be > 0"):
        optimal_frontier([0.1, 0.0])


@pytest.fixture(scope="module")
def optimum_runs(tmp_path_factory):
    """The toy SFT stage and PPO at β = 0.1 against the oracle, then their evaluation."""
    import os

    from prefl.callbacks import EntropyReport
    from prefl.pipeline import fit_stage
    from prefl.pipeline_report import evaluate_exports

    out = tmp_path_factory.mktemp("optimum")
    previous = os.getcwd()
    os.chdir(out)
    try:
        sft = fit_stage("sft")
        entropy = next(c for c in sft.trainer.callbacks if isinstance(c, EntropyReport))
        fit_stage("ppo_optimum", ["--trainer.logger=false"])
        exports = {"sft": "runs/toy/sft/export", "ppo": "runs/toy/ppo_optimum/export"}
        return entropy.results, evaluate_exports(exports, num_samples=16)
    finally:
        os.chdir(previous)


@pytest.mark.slow
def test_sft_nll_is_within_one_percent_of_the_generator_entropy(optimum_runs):
    entropy, _ = optimum_runs
    assert 1.0 <= entropy["ratio"] < 1.01, entropy
    assert entropy["generator_nll"] == pytest.approx(entropy["exact_entropy"], rel=0.01)


@pytest.mark.slow
def test_ppo_reaches_the_exact_optimum_at_beta_one_tenth(optimum_runs):
    _, results = optimum_runs
    (optimum,) = optimal_frontier([0.1])  # R* = 0.881, KL* = 3.34
    ppo = results["ppo"]
    assert abs(ppo["reward"] - optimum["reward"]) < 0.05, (ppo, optimum)
    assert abs(ppo["kl"] - optimum["kl"]) < 0.3 * optimum["kl"], (ppo, optimum)
