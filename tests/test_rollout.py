"""Tests for the PPO rollout pieces: :mod:`prefl.generation.rollout`, the :class:`Scorer` and the
:class:`KLController`, on hand values and on the tiny random toy model.

The toy model (tied random embeddings) mostly repeats the last prompt token with a top-logit gap
of about 0.7, so at temperature 0.01 sampling is greedy. To control where EOS appears, a forward
hook on ``lm_head`` (:class:`ForcedEOS`) removes every special token from the logits and puts a
logit of ``+1e4`` on EOS for chosen rows at chosen generation steps: those rows end exactly there
and no other row ever ends.
"""

from __future__ import annotations

import pytest
import torch

from prefl.generation.rewards import Scorer
from prefl.generation.rollout import (
    Responses,
    response_logprobs,
    response_values,
    sample_responses,
    token_rewards,
)
from prefl.models import CausalLMSpec
from prefl.models.reward import RewardModel, build_reward_model
from prefl.models.value import build_value_model
from prefl.training.kl_control import KLController

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
PAD, EOS = 0, 1
SPECIALS = [0, 1, 2, 3, 4, 5, 6]  # <pad> <eos> <bos> <unk> and the three role markers
PROMPTS = ["happily , the plot was", "alas , the film is great good bad"]  # 6 and 9 tokens
# (prompt index, response words, ends with EOS)
ROWS = [
    (0, "great good", True),
    (1, "bad dull boring superb", False),
    (0, "fun", True),
]


@pytest.fixture(scope="module")
def reward_model(tok):
    torch.manual_seed(1)
    return RewardModel(build_reward_model(CausalLMSpec(config="toy"), tok), tok).eval()


def encode(tok, prompts):
    """Left-padded prompt ids and mask ``(B, P)`` (BOS included)."""
    ids = tok(list(prompts))["input_ids"]
    width = max(len(i) for i in ids)
    padded = torch.tensor([[PAD] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return padded, mask


def hand_responses(tok, rows=ROWS):
    """Responses built by hand from ``rows``: left-padded prompts, right-padded responses.

    Returns the :class:`Responses` and, per row, the unpadded ``(prompt ids, response ids)``.
    """
    alone = []
    for prompt, words, ended in rows:
        p = tok(PROMPTS[prompt])["input_ids"]
        r = tok(words, add_special_tokens=False)["input_ids"] + ([EOS] if ended else [])
        alone.append((p, r))
    width_p = max(len(p) for p, _ in alone)
    width_r = max(len(r) for _, r in alone)
    responses = Responses(
        torch.tensor([[PAD] * (width_p - len(p)) + p for p, _ in alone]),
        torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p, _ in alone]),
        torch.tensor([r + [PAD] * (width_r - len(r)) for _, r in alone]),
        torch.tensor([[1] * len(r) + [0] * (width_r - len(r)) for _, r in alone]),
        torch.tensor([ended for *_, ended in rows]),
    )
    return responses, alone


class ForcedEOS:
    """``lm_head`` forward hook: no special tokens, except EOS forced on row ``r`` at generation
    step ``at[r]`` (step 0 = the first generated token)."""

    def __init__(self, at: dict[int, int]):
        self.at, self.step = at, 0

    def __call__(self, module, inputs, output):
        out = output.clone()
        out[..., SPECIALS] = -1e4
        for row, step in self.at.items():
            if step == self.step:
                out[row, -1, EOS] = 1e4
        self.step += 1
        return out


def sample(model, tok, **kw):
    ids, mask = encode(tok, PROMPTS)
    args = dict(k=2, temperature=1.0, max_new_tokens=6, pad_token_id=PAD, eos_token_id=EOS, seed=0)
    return sample_responses(model, ids, mask, **{**args, **kw})


# ------------------------------------------------------------------------------ token_rewards


def test_token_rewards_by_hand():
    """β = 0.5, rows of lengths 3, 2 and 1 (width 3)::

        row 0: -0.5·[0.1, 0.2, 0.3]  + score 1.0 on t=2  = [-0.05, -0.1, 0.85]
        row 1: -0.5·[0.5, -0.4, ·]   + score -2.0 on t=1 = [-0.25, -1.8, 0]
        row 2: -0.5·[0.2, ·, ·]      + score 0.3 on t=0  = [0.2, 0, 0]

    The KL values on padding (9, 7, -3) must not leak in.
    """
    scores = torch.tensor([1.0, -2.0, 0.3])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.4, 9.0], [0.2, 7.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, 0.85], [-0.25, -1.8, 0.0], [0.2, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-7)
    # β = 0: only the scores, on the last valid token
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, -2.0, 0.0], [0.3, 0.0, 0.0]])
    torch.testing.assert_close(token_rewards(scores, kl, mask, 0.0), expected, rtol=0, atol=0)
    # sum over a row = score - β·(sequence KL)
    totals = token_rewards(scores, kl, mask, 0.5).sum(-1)
    torch.testing.assert_close(totals, scores - 0.5 * (kl * mask).sum(-1), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- sample_responses


def test_sample_responses_repeats_each_prompt_k_times_in_order(model, tok):
    """``repeat_interleave`` order: rows ``[i·k, (i+1)·k)`` belong to prompt ``i``. At
    temperature 0.01 sampling is greedy, so a prompt's ``k`` rows are identical and equal what
    the prompt alone (no padding at all) gives: left padding changes nothing (design §5.1)."""
    ids, mask = encode(tok, PROMPTS)
    r = sample(model, tok, k=3, temperature=0.01, max_new_tokens=5)
    assert torch.equal(r.query_ids, ids.repeat_interleave(3, dim=0))
    assert torch.equal(r.query_mask, mask.repeat_interleave(3, dim=0))
    assert r.response_ids.shape == (6, 5)
    for i, prompt in enumerate(PROMPTS):
        rows = r.response_ids[3 * i : 3 * i + 3]
        assert torch.equal(rows, rows[:1].expand(3, -1))
        alone_ids, alone_mask = encode(tok, [prompt])
        alone = sample_responses(
            model,
            alone_ids,
            alone_mask,
            k=1,
            temperature=0.01,
            max_new_tokens=5,
            pad_token_id=PAD,
            eos_token_id=EOS,
            seed=7,
        )
        assert torch.equal(alone.response_ids[0], rows[0])
    assert not torch.equal(r.response_ids[0], r.response_ids[3])  # the prompts differ


def test_sample_responses_truncates_after_the_first_eos(model, tok):
    """Rows 0, 4 and 5 (of 2 prompts × 3) are forced to EOS at steps 1, 0 and 3; the others
    never end, so the width is ``max_new_tokens`` = 5::

        row 0: w EOS PAD PAD PAD   mask 1 1 0 0 0   ended
        row 4: EOS PAD PAD PAD PAD mask 1 0 0 0 0   ended
        row 5: w w w EOS PAD       mask 1 1 1 1 0   ended
        rows 1-3: w w w w w        mask 1 1 1 1 1   not ended
    """
    hook = model.lm_head.register_forward_hook(ForcedEOS({0: 1, 4: 0, 5: 3}))
    try:
        r = sample(model, tok, k=3, max_new_tokens=5)
    finally:
        hook.remove()
    expected_mask = [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0],
    ]
    assert r.response_mask.tolist() == expected_mask
    assert r.ended.tolist() == [True, False, False, False, True, True]
    valid = r.response_mask.bool()
    assert (r.response_ids[~valid] == PAD).all()  # padding after the first EOS
    last = valid.long().sum(-1) - 1
    ends = r.response_ids[torch.arange(6), last]
    assert torch.equal(ends == EOS, r.ended)  # EOS is the last valid token of the ended rows
    words = valid.clone()
    words[torch.arange(6), last] = ~r.ended  # valid tokens other than the final EOS
    assert (r.response_ids[words] >= len(SPECIALS)).all()


def test_sample_responses_seed_decides_and_global_rng_is_untouched(model, tok):
    """Same seed → same responses; another seed → others; the global RNG state is restored
    and the policy's train/eval mode too."""
    model.train()
    state = torch.get_rng_state()
    a = sample(model, tok, k=4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    model.eval()
    b = sample(model, tok, k=4, seed=3)
    c = sample(model, tok, k=4, seed=4)
    assert not model.training
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------- log-probs and values


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_a_hand_computation(model, tok, temperature):
    """For row ``i`` with unpadded prompt ``p`` and response ``r``, run the model on ``p + r``
    alone (no padding, default positions) and take
    ``log_softmax(logits / T)[len(p) - 1 + t, r[t]]``: the batched, left- and right-padded
    computation must agree (design §5.1, §5.2), with 0 on padding. The entropy at valid positions
    is ``-Σ softmax·log_softmax`` of the same scaled logits."""
    responses, alone = hand_responses(tok)
    logps, entropy = response_logprobs(model, responses, temperature, with_entropy=True)
    assert logps.shape == responses.response_ids.shape
    with torch.no_grad():
        for i, (p, r) in enumerate(alone):
            logits = model(input_ids=torch.tensor([p + r])).logits[0] / temperature
            log_probs = torch.log_softmax(logits.float(), -1)[len(p) - 1 : len(p) - 1 + len(r)]
            expected = log_probs.gather(-1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(logps[i, : len(r)], expected, rtol=0, atol=1e-5)
            assert (logps[i, len(r) :] == 0).all()
            ent = -(log_probs.exp() * log_probs).sum(-1)
            torch.testing.assert_close(entropy[i, : len(r)], ent, rtol=0, atol=1e-5)


def test_temperature_changes_the_logprobs(model, tok):
    responses, _ = hand_responses(tok)
    with torch.no_grad():
        cold, _ = response_logprobs(model, responses, 0.5)
        warm, _ = response_logprobs(model, responses, 1.0)
    valid = responses.response_mask.bool()
    assert (cold[valid] - warm[valid]).abs().min() > 1e-4


def test_response_values_read_the_state_before_each_token(tok):
    """``V`` for response token ``t`` is the head's output at position ``len(p) - 1 + t`` of
    ``p + r`` run alone; 0 on padding."""
    torch.manual_seed(2)
    value_model = build_value_model(CausalLMSpec(config="toy"), tok).eval()
    responses, alone = hand_responses(tok)
    with torch.no_grad():
        values = response_values(value_model, responses)
        for i, (p, r) in enumerate(alone):
            ids = torch.tensor([p + r])
            full = value_model(ids, torch.ones_like(ids))[0]
            expected = full[len(p) - 1 : len(p) - 1 + len(r)]
            torch.testing.assert_close(values[i, : len(r)], expected, rtol=0, atol=1e-5)
            assert (values[i, len(r) :] == 0).all()


# --------------------------------------------------------------------------------- scoring


def reward_alone(reward_model, ids):
    ids = torch.tensor([ids])
    return reward_model(ids, torch.ones_like(ids))[0]


def test_reward_model_reads_the_last_real_token_whatever_the_padding(reward_model, tok):
    """Through the :class:`Scorer`, ``[left-padded prompt | right-padded response]`` gives each
    row the reward of its sequence run alone (design §5.5); so do a fully right-padded and a
    fully left-padded batch of the same sequences."""
    responses, alone = hand_responses(tok)
    prompts = [PROMPTS[p] for p, *_ in ROWS]
    completions = tok.batch_decode(responses.response_ids, skip_special_tokens=True)
    scorer = Scorer(reward_model, [], [1.0], normalize=False, no_eos_score=None)
    with torch.no_grad():
        expected = torch.stack([reward_alone(reward_model, p + r) for p, r in alone])
        scores = scorer(responses, prompts, completions)
        torch.testing.assert_close(scores["score"], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(scores["reward_model"], expected, rtol=0, atol=1e-5)
        seqs = [p + r for p, r in alone]
        width = max(len(s) for s in seqs)
        right = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
        right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        left = torch.tensor([[PAD] * (width - len(s)) + s for s in seqs])
        left_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        torch.testing.assert_close(reward_model(right, right_mask), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(reward_model(left, left_mask), expected, rtol=0, atol=1e-5)
        # a reward model with another tokenizer re-tokenizes the texts (completion + EOS):
        # the same sequences for the rows that ended
        texts = Scorer(reward_model, [], [1.0], False, None, same_tokenizer=False)
        retokenized = texts(responses, prompts, completions)["score"]
    ended = responses.ended
    torch.testing.assert_close(retokenized[ended], expected[ended], rtol=0, atol=1e-5)


def constant(values):
    """A reward function returning ``values`` whatever the texts."""
    return lambda prompts, completions: list(values)


def score(scorer, tok):
    responses, _ = hand_responses(tok)  # rows 0 and 2 ended, row 1 did not
    prompts = [PROMPTS[p] for p, *_ in ROWS]
    completions = tok.batch_decode(responses.response_ids, skip_special_tokens=True)
    return scorer(responses, prompts, completions)


def test_no_eos_score_replaces_the_score_of_unfinished_responses(tok):
    fn = constant([0.3, 0.7, -0.2])
    out = score(Scorer(None, [fn], [1.0], no_eos_score=-1.0), tok)
    torch.testing.assert_close(out["score"], torch.tensor([0.3, -1.0, -0.2]), rtol=0, atol=0)
    torch.testing.assert_close(out["raw"], torch.tensor([0.3, 0.7, -0.2]), rtol=0, atol=0)
    kept = score(Scorer(None, [fn], [1.0], no_eos_score=None), tok)
    torch.testing.assert_close(kept["score"], torch.tensor([0.3, 0.7, -0.2]), rtol=0, atol=0)


def test_reward_clip_clips_the_final_score(tok):
    """``clip = 1``: 2.5 → 1, -3 → -1, 0.5 stays; the no-EOS penalty -5 is clipped too."""
    fn = constant([2.5, 0.5, -3.0])
    out = score(Scorer(None, [fn], [1.0], no_eos_score=None, clip=1.0), tok)
    torch.testing.assert_close(out["score"], torch.tensor([1.0, 0.5, -1.0]), rtol=0, atol=0)
    torch.testing.assert_close(out["raw"], torch.tensor([2.5, 0.5, -3.0]), rtol=0, atol=0)
    out = score(Scorer(None, [fn], [1.0], no_eos_score=-5.0, clip=1.0), tok)
    torch.testing.assert_close(out["score"], torch.tensor([1.0, -1.0, -1.0]), rtol=0, atol=0)


def test_weights_combine_sources_and_normalize_uses_the_stored_stats(reward_model, tok):
    """Weights ``[2, -0.5]`` over (reward model, fn), stored stats mean 0.25 and std 4: with
    ``normalize`` the score is ``2·(rm - 0.25)/4 - 0.5·fn``, without it ``2·rm - 0.5·fn`` (and a
    reward model without stats is left as it is)."""
    responses, alone = hand_responses(tok)
    with torch.no_grad():
        rm = torch.stack([reward_alone(reward_model, p + r) for p, r in alone])
    fn_values = [1.0, -2.0, 0.5]
    fn = torch.tensor(fn_values)
    stats_model = RewardModel(reward_model.model, tok, stats={"mean": 0.25, "std": 4.0})
    with torch.no_grad():
        out = score(Scorer(stats_model, [constant(fn_values)], [2.0, -0.5], True, None), tok)
        raw = score(Scorer(stats_model, [constant(fn_values)], [2.0, -0.5], False, None), tok)
        no_stats = score(Scorer(reward_model, [constant(fn_values)], [2.0, -0.5], True, None), tok)
    normalized = (rm - 0.25) / 4.0
    torch.testing.assert_close(out["reward_model"], normalized, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["fn0"], fn, rtol=0, atol=0)
    torch.testing.assert_close(out["score"], 2 * normalized - 0.5 * fn, rtol=0, atol=1e-5)
    torch.testing.assert_close(raw["score"], 2 * rm - 0.5 * fn, rtol=0, atol=1e-5)
    torch.testing.assert_close(no_stats["score"], raw["score"], rtol=0, atol=1e-6)  # no stats
    # two functions, weights 1 and 3: 0.1 + 3·0.2 = 0.7
    fns = [constant([0.1] * 3), constant([0.2] * 3)]
    two = score(Scorer(None, fns, [1.0, 3.0], True, None), tok)
    torch.testing.assert_close(two["score"], torch.full((3,), 0.7), rtol=0, atol=1e-6)


def test_scorer_errors(reward_model):
    with pytest.raises(ValueError, match="model.reward_model and/or model.reward_fns"):
        Scorer(None, [], [])
    with pytest.raises(ValueError, match="1 reward weights for 2 reward sources"):
        Scorer(reward_model, [constant([0.0])], [1.0])
    with pytest.raises(ValueError, match="2 reward weights for 1 reward sources"):
        Scorer(None, [constant([0.0])], [1.0, 1.0])


# ----------------------------------------------------------------------------- KLController


def test_fixed_kl_controller_is_constant():
    ctl = KLController(0.05)
    for kl, n in [(0.0, 8), (100.0, 10_000), (-3.0, 1)]:
        ctl.update(kl, n)
        assert ctl.value == 0.05


def test_adaptive_kl_controller_by_hand():
    """β₀ = 0.1, target 6, horizon 10 000, ``β *= 1 + clip(kl/6 - 1, ±0.2)·n/10 000``:

    1. kl 3, n 64:       err = clip(-0.5) = -0.2 → β = 0.1·(1 - 0.00128)   = 0.099872
    2. kl 6.6, n 100:    err = 0.1               → β = 0.099872·1.001      = 0.099971872
    3. kl 60, n 10 000:  err = clip(9) = 0.2     → β = 0.099971872·1.2     = 0.1199662464
    4. kl 6, n 500:      err = 0                 → unchanged
    """
    ctl = KLController(0.1, target=6.0, horizon=10_000)
    steps = [(3.0, 64), (6.6, 100), (60.0, 10_000), (6.0, 500)]
    expected = [0.099872, 0.099971872, 0.1199662464, 0.1199662464]
    for (kl, n), value in zip(steps, expected, strict=True):
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(value, rel=1e-12)


def test_kl_controller_state_dict_round_trips():
    ctl = KLController(0.1, target=2.0, horizon=50)
    ctl.update(5.0, 8)
    state = ctl.state_dict()
    restored = KLController(1.0)  # other values, and fixed
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    for kl, n in [(0.5, 8), (3.0, 16)]:
        ctl.update(kl, n)
        restored.update(kl, n)
        assert restored.value == ctl.value
