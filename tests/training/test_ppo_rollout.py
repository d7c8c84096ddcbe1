"""``prefl.training.ppo_rollout`` and ``prefl.training.ppo_metrics`` as plain functions: seeds,
advantages, offloading, the rollout of a data-parallel batch with a padding repeat, the sample
table and the logged means, on hand values and on the tiny random toy model.
(``tests/modules/test_ppo.py`` checks the same rollout through ``PPOModule``.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

from prefl.functional import gae, masked_mean, masked_var
from prefl.generation.rewards import Scorer
from prefl.generation.rollout import Responses
from prefl.training.ppo_metrics import rollout_means, update_metrics
from prefl.training.ppo_rollout import (
    Rollout,
    check_estimator,
    collect_rollout,
    compute_advantages,
    offload,
    on_device,
    rollout_seed,
)
from prefl.training.ppo_update import UpdateStats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
REWARDS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [0.5, 1.5, 0.0]])


def test_rollout_seed_by_hand():
    """``((seed·1000003 + epoch)·1000003 + batch)·1009 + rank`` mod 2⁶³: (0, 1, 2, 3) gives
    (1000003 + 2)·1009 + 3 = 1009005048; ranks differ by one, every input changes it."""
    assert rollout_seed(0, 0, 0, 0) == 0
    assert rollout_seed(0, 1, 2, 3) == 1009005048
    assert rollout_seed(0, 1, 2, 4) == 1009005049
    seeds = {rollout_seed(*args) for args in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)]}
    assert len(seeds) == 3 and all(0 <= s < 2**63 for s in seeds)


def test_check_estimator_names_the_config_keys():
    check_estimator("gae", 1)
    check_estimator("reinforce_baseline", 1)
    with pytest.raises(ValueError, match="model.advantage_estimator='ppo2'"):
        check_estimator("ppo2", 4)
    for name in ("rloo", "grpo"):
        with pytest.raises(ValueError, match=f"model.num_samples must be >= 2 for {name}"):
            check_estimator(name, 1)


def test_critic_free_advantages_by_hand():
    """RLOO with k = 2 over row returns (1, 3, 2, 2): ``R_i - R_other`` = (-2, 2, 0, 0), one
    value per response spread over its valid tokens; no returns."""
    advantages, returns = compute_advantages(
        REWARDS, MASK, None, estimator="rloo", k=2, gamma=1.0, lam=0.95, whiten=False
    )
    assert returns is None
    torch.testing.assert_close(advantages, torch.tensor([-2.0, 2.0, 0.0, 0.0])[:, None] * MASK)


def test_gae_advantages_and_whitening():
    """GAE equals :func:`gae`; whitening gives masked mean 0 and biased variance 1 and leaves
    the returns (advantages before whitening + values) alone; GAE without values is refused."""
    values = torch.arange(12.0).view(4, 3) / 10 * MASK
    expected, expected_returns = gae(REWARDS, values, MASK, 0.9, 0.8)
    kw = dict(estimator="gae", k=2, gamma=0.9, lam=0.8)
    raw, returns = compute_advantages(REWARDS, MASK, values, whiten=False, **kw)
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(returns, expected_returns)
    white, white_returns = compute_advantages(REWARDS, MASK, values, whiten=True, **kw)
    torch.testing.assert_close(white_returns, returns)
    assert abs(masked_mean(white, MASK).item()) < 1e-6
    assert masked_var(white, MASK, unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (white[MASK == 0] == 0).all()
    with pytest.raises(ValueError, match="needs the critic's values"):
        compute_advantages(REWARDS, MASK, None, whiten=False, **kw)


class Recorded(torch.nn.Linear):
    """A module that records where it is moved to."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(2, 2)
        self.log = log

    def to(self, device, *args, **kwargs):
        self.log.append(str(device))
        return super().to(device, *args, **kwargs)


def test_on_device_moves_there_and_back_even_on_error():
    log: list[str] = []
    models = [Recorded(log), Recorded(log)]
    with on_device(models, torch.device("cpu")):
        log.append("inside")
    assert log == ["cpu", "cpu", "inside", "cpu", "cpu"]
    log.clear()
    with pytest.raises(RuntimeError, match="boom"), on_device(models, torch.device("cpu")):
        raise RuntimeError("boom")
    assert log == ["cpu", "cpu", "cpu", "cpu"]
    log.clear()
    with on_device([], torch.device("cpu")):
        pass
    offload(models)
    assert log == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="offload_frozen does not combine with a sharded"):
        offload(models, sharded=True)


def batch_of(tok, prompts, weights=None):
    """A ``prompts`` batch of left-padded prompt ids (BOS included)."""
    ids = tok(list(prompts))["input_ids"]
    width = max(len(i) for i in ids)
    batch = {
        "prompt_input_ids": torch.tensor([[0] * (width - len(i)) + i for i in ids]),
        "prompt_attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
        "prompt": list(prompts),
    }
    if weights is not None:
        batch["sample_weight"] = torch.tensor(weights)
    return batch


def test_collect_rollout_of_a_batch_with_a_padding_repeat(model, tok):
    """2 prompts × k = 2, the second prompt a data-parallel padding repeat (weight 0), the
    reference the policy itself: N = 4 rows in ``repeat_interleave`` order, KL exactly 0, the
    repeat's rows weigh 0 and have an all-0 mask (so 0 advantages and KL) while their log-probs
    are still computed; every row's rewards sum to its score (β 0.1 times a 0 KL)."""
    calls = []

    @contextlib.contextmanager
    def reference():
        calls.append("reference")
        yield model

    scorer = Scorer(None, [lambda p, c: [float(len(x)) for x in c]], [1.0], no_eos_score=None)
    prompts = ["happily , the plot was", "alas , the film is"]
    r = collect_rollout(
        batch_of(tok, prompts, weights=[1.0, 0.0]),
        3,
        policy=model,
        reference=reference,
        scorer=scorer,
        value_model=None,
        tokenizer=tok,
        num_samples=2,
        temperature=0.7,
        max_new_tokens=4,
        kl_coef=0.1,
        estimator="reinforce_baseline",
        gamma=1.0,
        lam=0.95,
        whiten=False,
    )
    assert calls == ["reference"]
    assert r.prompts == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert len(r.completions) == 4 and r.responses.response_ids.shape[0] == 4
    torch.testing.assert_close(r.weights, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(r.mask, r.responses.response_mask.float() * r.weights[:, None])
    assert (r.mask[2:] == 0).all() and (r.mask[:2].sum(-1) > 0).all()
    assert torch.equal(r.kl, torch.zeros_like(r.kl))
    assert (r.advantages[2:] == 0).all()
    assert (r.logprobs[2:] != 0).any()  # computed for the repeats too (they only weigh 0)
    # the score sits on each row's last valid token (a repeat's: its first, outside the mask)
    torch.testing.assert_close(r.rewards.sum(-1), r.scores["score"])
    assert r.values is None and r.returns is None


def hand_rollout(n_tokens=(2, 3, 1, 0), weights=(1.0, 1.0, 1.0, 0.0), scores=(1.0, -1.0, 0.5, 9.0)):
    """A hand-made rollout of N = 4 rows of R = 3 tokens (the contents of ``responses`` are
    dummies apart from the mask and ``ended``)."""
    n, width = len(n_tokens), 3
    response_mask = torch.tensor([[1] * t + [0] * (width - t) for t in n_tokens])
    weight = torch.tensor(weights)
    mask = response_mask.float() * weight[:, None]
    responses = Responses(
        torch.ones(n, 2, dtype=torch.long),
        torch.ones(n, 2, dtype=torch.long),
        response_mask.clone(),
        response_mask,
        torch.tensor([True, False, True, False]),
    )
    score = torch.tensor(scores)
    kl = torch.full((n, width), 0.5) * mask
    zeros = torch.zeros(n, width)
    return Rollout(
        responses=responses,
        mask=mask,
        weights=weight,
        logprobs=zeros,
        ref_logprobs=zeros,
        kl=kl,
        rewards=kl.clone(),
        advantages=torch.arange(12.0).view(n, width) * mask,
        values=None,
        returns=None,
        scores={"score": score, "raw": score + 1, "fn0": score * 2},
        prompts=["a|b", "c", "d\ne", "f"],
        completions=["x", "y|z", "w", "v"],
    )


def test_rollout_means_by_hand_and_over_two_ranks():
    """Real rows 0-2 (row 3 a repeat, weight 0) with scores (1, -1, 0.5): ``ppo/score`` 1/6;
    lengths (2, 3, 1) → 2; KL 0.5 a token → sequence KL (1, 1.5, 0.5) → 1; EOS rate 2/3;
    advantages over the 6 valid tokens (0, 1, 3, 4, 5, 6) → 19/6. Two identical ranks (a
    reduction that doubles) give the same means and n = 2·3 = 6, in one reduction call."""
    r = hand_rollout()
    calls = []

    def two_ranks(t):
        calls.append(t.shape)
        return 2 * t

    for reduce, n_expected in ((None, 3), (two_ranks, 6)):
        means, n = rollout_means(r, reduce)
        assert n == n_expected
        expected = {
            "ppo/score": 1 / 6,
            "ppo/score_raw": 7 / 6,
            "ppo/reward": 1.0,
            "ppo/kl": 1.0,
            "ppo/response_length": 2.0,
            "ppo/eos_rate": 2 / 3,
            "ppo/score_fn0": 1 / 3,
            "ppo/advantage_mean": 19 / 6,
        }
        assert list(means) == list(expected)
        for key, value in expected.items():
            assert means[key].item() == pytest.approx(value, abs=1e-6), key
    assert len(calls) == 1


def test_update_metrics_and_the_sample_table():
    r = hand_rollout()
    stats = UpdateStats(policy_loss=0.5, clip_frac=0.25, approx_kl=0.01, entropy=2.0)
    metrics = update_metrics(r, stats, 0.05)
    assert list(metrics) == [
        "ppo/kl_coef",
        "ppo/policy_loss",
        "ppo/clip_frac",
        "ppo/approx_kl",
        "ppo/entropy",
    ]
    assert metrics["ppo/kl_coef"].item() == pytest.approx(0.05)
    table = r.markdown(rows=3).splitlines()
    assert table == [
        "| prompt | response | score |",
        "|---|---|---|",
        "| a\\|b | x | +1.000 |",
        "| c | y\\|z | -1.000 |",
        "| d e | w | +0.500 |",
    ]
