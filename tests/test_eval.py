"""prefl.generation.evaluate: diversity, win rate and the policy-vs-reference evaluation."""

import pytest
import torch

from prefl.generation.evaluate import distinct_n, evaluate, win_rate
from prefl.models import CausalLMSpec, build_causal_lm
from prefl.tasks import toy


def test_distinct_n_by_hand():
    """'a b a b' has unigrams a,b,a,b (2 unique of 4) and bigrams ab,ba,ab (2 of 3); with 'c'
    added as a second completion: unigrams 3 unique of 5, bigrams 2 of 3."""
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b a b", "c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a b", "c"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 1) == 0.0


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]) == pytest.approx(2.5 / 4)


@pytest.fixture(scope="module")
def models(tok, model):
    """The toy tokenizer, the shared toy model (seed 0) and another (seed 1), both in eval mode."""
    torch.manual_seed(1)
    return tok, model, build_causal_lm(CausalLMSpec(config="toy"), tok).eval()


def test_a_model_against_itself(models):
    tok, a, _ = models
    prompts = toy.split_prompts()[1][:6]
    r = evaluate(a, a, tok, prompts, toy.oracle_rewards, num_samples=2, max_new_tokens=6)
    assert r["kl"] == pytest.approx(0.0, abs=1e-5)
    assert r["win_rate"] == 0.5  # same seed: the same samples, all ties
    assert r["reward"] == r["reference_reward"]
    assert set(r) == {
        "reward",
        "reference_reward",
        "kl",
        "win_rate",
        "eos_rate",
        "mean_length",
        "distinct_1",
        "distinct_2",
    }
    assert 0 < r["mean_length"] <= 6


def test_different_models_have_positive_kl(models):
    tok, a, b = models
    prompts = toy.split_prompts()[1][:6]
    r = evaluate(a, b, tok, prompts, toy.oracle_rewards, num_samples=4, max_new_tokens=6)
    assert r["kl"] > 0.01  # a Monte Carlo estimate of the KL between two random models
    assert 0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["eos_rate"] <= 1.0
