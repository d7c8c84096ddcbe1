"""The exact KL-regularised optimum of the toy task, and best-of-n, as reference lines.

Preference tuning maximises ``E[r] - β·KL(π ‖ π_ref)``, whose optimum is
``π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β)``. On the toy task the reference is the generator of the
SFT corpus and the reward is the oracle, so the best reward reachable at each KL is known:

    R*(β) = E_ref[r·e^{r/β}] / E_ref[e^{r/β}],      KL*(β) = R*(β)/β − log E_ref[e^{r/β}]

per prompt, averaged over the evaluation prompts. The generator draws a uniform length ``L`` in
``MIN_WORDS..MAX_WORDS`` and i.i.d. words whose category (positive, negative, neutral) has the
probabilities of the prompt's mood; the oracle is ``(n_pos − n_neg) / L``. So the reward's
distribution under the reference is a finite sum of multinomial terms, and the expectations above
are computed **exactly** by enumeration (:func:`reward_distribution`). :func:`optimal_frontier`
also gives the Monte Carlo estimate over generator samples with its standard error (the issue's
recipe), which the tests check against the exact value.

Best-of-n from the generator is the second reference line: its reward is ``E[max of n]`` (exact
from the same distribution) and its KL is at most ``log n − (n−1)/n``.

The generator's exact entropy per token (:func:`entropy_per_token`, the EOS token included) is
the floor of the SFT model's held-out NLL per token.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from prefl.tasks import toy


def reward_distribution(mood: str) -> dict[float, float]:
    """The oracle reward's exact distribution under the generator for a prompt of ``mood``:
    ``{reward: probability}`` (probabilities sum to 1)."""
    p_pos, p_neg, p_neu = toy.MOOD_PROBS[mood]
    lengths = range(toy.MIN_WORDS, toy.MAX_WORDS + 1)
    out: dict[float, float] = {}
    for n in lengths:
        for pos in range(n + 1):
            for neg in range(n + 1 - pos):
                ways = math.comb(n, pos) * math.comb(n - pos, neg)
                prob = ways * p_pos**pos * p_neg**neg * p_neu ** (n - pos - neg) / len(lengths)
                reward = round((pos - neg) / n, 12)
                out[reward] = out.get(reward, 0.0) + prob
    return out


def _moods(prompts: Sequence[str] | None) -> list[str]:
    prompts = toy.split_prompts()[1] if prompts is None else prompts
    if not prompts:
        raise ValueError("no prompts to average the optimum over")
    return [toy.prompt_mood(p) for p in prompts]


def _exact_point(beta: float, mood: str) -> tuple[float, float]:
    dist = reward_distribution(mood)
    top = max(dist)  # shift the exponent for stability: e^{(r - top)/β}
    z = sum(p * math.exp((r - top) / beta) for r, p in dist.items())
    reward = sum(p * r * math.exp((r - top) / beta) for r, p in dist.items()) / z
    return reward, reward / beta - (math.log(z) + top / beta)


def _sampled_point(beta: float, rewards: list[float]) -> tuple[float, float, float, float]:
    """Self-normalised estimates of (R*, KL*) from reference samples, with delta-method errors."""
    top = max(rewards)
    w = [math.exp((r - top) / beta) for r in rewards]
    n, mean_w = len(w), sum(w) / len(w)
    reward = sum(wi * r for wi, r in zip(w, rewards, strict=True)) / (n * mean_w)
    var_r = sum((wi * (r - reward)) ** 2 for wi, r in zip(w, rewards, strict=True)) / n
    se_reward = math.sqrt(var_r / n) / mean_w
    # KL = R/β − log mean(w) − top/β: the derivative in mean(w) pairs with R's error
    grad = [
        wi * (r - reward) / (beta * mean_w) - (wi - mean_w) / mean_w
        for wi, r in zip(w, rewards, strict=True)
    ]
    se_kl = math.sqrt(sum(g * g for g in grad) / n / n)
    kl = reward / beta - math.log(mean_w) - top / beta
    return reward, kl, se_reward, se_kl


def optimal_frontier(
    betas: Sequence[float],
    prompts: Sequence[str] | None = None,
    n_samples: int | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """The optimal reward–KL curve ``(R*(β), KL*(β))`` over ``prompts``.

    Args:
        betas: KL coefficients (> 0).
        prompts: Toy prompts to average over; None = the held-out evaluation prompts.
        n_samples: None = exact (enumeration; errors 0). Otherwise the Monte Carlo estimate from
            this many generator samples per prompt mood, with standard errors.
        seed: Seed of the Monte Carlo samples.

    Returns:
        One dict per β: ``beta``, ``reward``, ``kl``, ``reward_se``, ``kl_se``.
    """
    if any(b <= 0 for b in betas):
        raise ValueError(f"betas must be > 0: {list(betas)}")
    moods = _moods(prompts)
    samples: dict[str, list[float]] = {}
    if n_samples is not None:
        rng = random.Random(seed)
        for mood in sorted(set(moods)):
            prompt = next(p for p, m in toy.OPENERS.items() if m == mood) + " , the film was"
            samples[mood] = [
                toy.oracle_reward(prompt, toy.sample_completion(prompt, rng))
                for _ in range(n_samples)
            ]
    out = []
    for beta in betas:
        points = {}
        for mood in set(moods):
            if n_samples is None:
                points[mood] = (*_exact_point(beta, mood), 0.0, 0.0)
            else:
                points[mood] = _sampled_point(beta, samples[mood])
        rows = [points[m] for m in moods]
        k = len(rows)
        out.append(
            {
                "beta": float(beta),
                "reward": sum(r[0] for r in rows) / k,
                "kl": sum(r[1] for r in rows) / k,
                # moods are sampled independently: the errors of the mean over prompts
                "reward_se": math.sqrt(sum(r[2] ** 2 for r in rows)) / k,
                "kl_se": math.sqrt(sum(r[3] ** 2 for r in rows)) / k,
            }
        )
    return out


def best_of_n(ns: Sequence[int], prompts: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Best-of-n from the generator: exact ``E[max of n rewards]`` and the KL bound
    ``log n − (n−1)/n``, averaged over ``prompts`` (None = the held-out prompts)."""
    moods = _moods(prompts)
    out = []
    for n in ns:
        if n < 1:
            raise ValueError(f"best_of_n: n must be >= 1, got {n}")
        by_mood = {}
        for mood in set(moods):
            dist = sorted(reward_distribution(mood).items())
            cdf, expected = 0.0, 0.0
            for reward, prob in dist:  # P(max = v) = F(v)^n − F(v⁻)^n
                expected += reward * ((cdf + prob) ** n - cdf**n)
                cdf += prob
            by_mood[mood] = expected
        reward = sum(by_mood[m] for m in moods) / len(moods)
        out.append({"n": n, "reward": reward, "kl": math.log(n) - (n - 1) / n})
    return out


def entropy_per_token(prompts: Sequence[str] | None = None) -> float:
    """The generator's exact entropy per completion token, EOS included: ``E[H(y|x)] /
    E[L + 1]``, averaged over ``prompts`` (None = the held-out prompts). A token-weighted mean,
    like a held-out NLL per token."""
    lengths = range(toy.MIN_WORDS, toy.MAX_WORDS + 1)
    mean_len = sum(lengths) / len(lengths)
    total = 0.0
    moods = _moods(prompts)
    for mood in moods:
        word = 0.0  # entropy of one word: category, then uniform within it
        for category, p in zip(
            (toy.POSITIVE, toy.NEGATIVE, toy.NEUTRAL), toy.MOOD_PROBS[mood], strict=True
        ):
            word -= p * math.log(p / len(category))
        total += math.log(len(lengths)) + mean_len * word
    return total / len(moods) / (mean_len + 1)


def frontier_reward_at(kl: float, frontier: Sequence[dict[str, float]]) -> float:
    """``R*`` at ``kl`` by linear interpolation on a frontier (clamped to its ends)."""
    points = sorted((p["kl"], p["reward"]) for p in frontier)
    if kl <= points[0][0]:
        return points[0][1]
    for (k0, r0), (k1, r1) in zip(points, points[1:], strict=False):
        if kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0)
    return points[-1][1]
