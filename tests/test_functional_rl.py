"""Hand-derived checks of the RL helpers in :mod:`prefl.functional`.

Covers :func:`whiten`, :func:`gae`, :func:`kl_penalty`, :func:`entropy_from_logits` and
:func:`explained_variance`. Expected numbers are worked out by hand in each test's docstring;
everything that is compared with a hand value runs in float64 with ``atol=1e-6``.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefl.functional import (
    KL_ESTIMATORS,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    whiten,
)

F64 = torch.float64
L2 = math.log(2.0)


def t(*rows, dtype=F64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# ------------------------------------------------------------------------------------ whiten


def test_whiten_hand_example(assert_close):
    """v = [1, 2, 3, 4]: mean 2.5, biased var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25,
    std = sqrt(1.25) = 1.1180340; whitened = [-1.5, -0.5, 0.5, 1.5] / 1.1180340
    = [-1.3416408, -0.4472136, 0.4472136, 1.3416408]."""
    out = whiten(t([1.0, 2.0, 3.0, 4.0]), torch.ones(1, 4))
    assert_close(out, [[-1.3416408, -0.4472136, 0.4472136, 1.3416408]])
    assert_close(out.mean(), 0.0)
    assert_close(out.pow(2).mean(), 1.0, tol=1e-6)  # biased variance 1 (up to eps)


def test_whiten_keep_mean(assert_close):
    """``shift_mean=False`` adds the mean 2.5 back: [1.1583592, 2.0527864, 2.9472136, 3.8416408]."""
    out = whiten(t([1.0, 2.0, 3.0, 4.0]), torch.ones(1, 4), shift_mean=False)
    assert_close(out, [[1.1583592, 2.0527864, 2.9472136, 3.8416408]])


def test_whiten_respects_mask_over_all_dims(assert_close):
    """The same four valid values spread over two rows, with garbage (1e6, inf, NaN) in the
    padding: statistics over all valid entries at once, padding exactly 0."""
    values = t([1.0, 2.0, 1e6], [3.0, 4.0, float("nan")])
    values[0, 2] = float("inf")
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = whiten(values, mask)
    assert_close(out, [[-1.3416408, -0.4472136, 0.0], [0.4472136, 1.3416408, 0.0]])
    out = whiten(values, mask.bool(), shift_mean=False)
    assert_close(out, [[1.1583592, 2.0527864, 0.0], [2.9472136, 3.8416408, 0.0]])


def test_whiten_all_masked_is_zero():
    out = whiten(t([1.0, float("nan")]), torch.zeros(1, 2))
    assert torch.equal(out, torch.zeros(1, 2, dtype=F64))


# --------------------------------------------------------------------------------------- gae


def test_gae_hand_gamma1_lam095(assert_close):
    """r = [0, 0, 1], V = [0.2, 0.4, 0.6], gamma = 1, lam = 0.95, gamma·lam = 0.95:

    t=2: delta = 1 + 0 - 0.6 = 0.4;            A2 = 0.4
    t=1: delta = 0 + 0.6 - 0.4 = 0.2;          A1 = 0.2 + 0.95·0.4  = 0.58
    t=0: delta = 0 + 0.4 - 0.2 = 0.2;          A0 = 0.2 + 0.95·0.58 = 0.751
    returns = A + V = [0.951, 0.98, 1.0].
    """
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.2, 0.4, 0.6]), torch.ones(1, 3), 1.0, 0.95)
    assert_close(adv, [[0.751, 0.58, 0.4]])
    assert_close(ret, [[0.951, 0.98, 1.0]])


def test_gae_hand_gamma09_lam05(assert_close):
    """r = [1, 0, 2], V = [0.5, 1.0, 1.5], gamma = 0.9, lam = 0.5, gamma·lam = 0.45:

    t=2: delta = 2 + 0.9·0   - 1.5 = 0.5;      A2 = 0.5
    t=1: delta = 0 + 0.9·1.5 - 1.0 = 0.35;     A1 = 0.35 + 0.45·0.5   = 0.575
    t=0: delta = 1 + 0.9·1.0 - 0.5 = 1.4;      A0 = 1.4  + 0.45·0.575 = 1.65875
    returns = A + V = [2.15875, 1.575, 2.0].
    """
    adv, ret = gae(t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5]), torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert_close(adv, [[1.65875, 0.575, 0.5]])
    assert_close(ret, [[2.15875, 1.575, 2.0]])


def test_gae_limits_td_and_monte_carlo(assert_close):
    """lam = 0 gives the TD errors; gamma = lam = 1 gives reward-to-go minus V.

    r = [1, 0, 2], V = [0.5, 1.0, 1.5]: TD (gamma = 0.9) = [1.4, 0.35, 0.5];
    reward-to-go = [3, 2, 2], so MC advantages = [2.5, 1.0, 0.5] and returns = [3, 2, 2].
    """
    r, v, m = t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5]), torch.ones(1, 3)
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.0)
    assert_close(adv, [[1.4, 0.35, 0.5]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert_close(adv, [[2.5, 1.0, 0.5]])
    assert_close(ret, [[3.0, 2.0, 2.0]])


def test_gae_padding_garbage_and_empty_row(assert_close):
    """Row 0: the hand example of length 3 padded to 5 with garbage (1e6, inf, NaN); row 1: a
    full row of length 5; row 2: all masked, all garbage. Results are unchanged by the padding,
    padding and the empty row are exactly 0, and returns = advantages + values on valid tokens.
    """
    nan, inf = float("nan"), float("inf")
    rewards = t([0.0, 0.0, 1.0, 1e6, nan], [0.1, -0.2, 0.3, 0.0, 1.0], [nan, inf, 1e6, 3.0, -inf])
    values = t([0.2, 0.4, 0.6, inf, -1e6], [0.5, 0.1, 0.0, 0.3, 0.2], [1e6, nan, inf, 2.0, 1.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_close(adv[0], [0.751, 0.58, 0.4, 0.0, 0.0])
    assert_close(ret[0], [0.951, 0.98, 1.0, 0.0, 0.0])
    adv1, ret1 = gae(rewards[1:2], values[1:2], mask[1:2], gamma=1.0, lam=0.95)
    assert_close(adv[1], adv1[0], tol=1e-12)
    assert torch.equal(adv[2], torch.zeros(5, dtype=F64))
    assert torch.equal(ret[2], torch.zeros(5, dtype=F64))
    valid = mask.bool()
    assert_close(ret[valid], (adv + values)[valid], tol=1e-12)
    # Changing the garbage does not change anything.
    adv2, ret2 = gae(rewards.nan_to_num(7.0), values.nan_to_num(-3.0), mask, 1.0, 0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_shape_errors_and_dtype():
    with pytest.raises(ValueError, match="same"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    adv, ret = gae(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3), torch.ones(2, 3))
    assert adv.dtype == ret.dtype == torch.float32


# -------------------------------------------------------------------------------- kl_penalty


def test_kl_estimators_hand_values(assert_close):
    """d = logp - ref = ±ln 2:
    k1 = ±0.6931472; k2 = 0.5·ln²2 = 0.2402265;
    k3(d = +ln 2) = e^{-ln 2} + ln 2 - 1 = 0.5 + 0.6931472 - 1 = 0.1931472;
    k3(d = -ln 2) = e^{ln 2} - ln 2 - 1 = 2 - 0.6931472 - 1 = 0.3068528."""
    logp, ref = t([L2, -L2]), t([0.0, 0.0])
    assert_close(kl_penalty(logp, ref), [[0.6931472, -0.6931472]])
    assert_close(kl_penalty(logp, ref, "k1"), [[0.6931472, -0.6931472]])
    assert_close(kl_penalty(logp, ref, "k2"), [[0.2402265, 0.2402265]])
    assert_close(kl_penalty(logp, ref, "k3"), [[0.1931472, 0.3068528]])


def test_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 32, generator=g) * 3
    ref = logp + torch.randn(64, 32, generator=g) * torch.logspace(-8, 1, 32)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    for kind in KL_ESTIMATORS:
        assert torch.equal(kl_penalty(logp, logp, kind), torch.zeros_like(logp))


def test_k1_and_k3_are_unbiased_under_exact_expectation(assert_close):
    """p = [1/2, 1/4, 1/4], q = [1/4, 1/4, 1/2]: KL(p‖q) = 1/2·ln 2 + 0 + 1/4·ln(1/2)
    = 1/4·ln 2 = 0.1732868; E_p[k1] and E_p[k3] equal it exactly, E_p[k2] does not."""
    p, q = t(0.5, 0.25, 0.25), t(0.25, 0.25, 0.5)
    kl = 0.25 * L2
    for kind in ("k1", "k3"):
        assert_close((p * kl_penalty(p.log(), q.log(), kind)).sum(), kl)
    assert abs((p * kl_penalty(p.log(), q.log(), "k2")).sum().item() - kl) > 1e-3


def test_kl_unknown_kind():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match=r"\['k1', 'k2', 'k3'\]"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


# ------------------------------------------------------------------------ entropy_from_logits


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def test_entropy_uniform_onehot_and_hand_value(assert_close):
    """Uniform logits over V = 7: ln 7 = 1.9459101. Logits [0, ln 3]: p = [1/4, 3/4],
    H = 1/4·ln 4 + 3/4·ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351. One logit 100 above the
    others: H ≈ 6·101·e^{-100} ≈ 0."""
    uniform = entropy_from_logits(torch.zeros(2, 3, 7))
    assert uniform.dtype == torch.float32 and uniform.shape == (2, 3)
    assert_close(uniform, torch.full((2, 3), math.log(7.0)), tol=1e-5)
    assert_close(entropy_from_logits(t([[0.0, math.log(3.0)]])), [[0.5623351]])
    peaked = torch.zeros(1, 4, 7)
    peaked[..., 2] = 100.0
    assert_close(entropy_from_logits(peaked), torch.zeros(1, 4), tol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 7, 100, None])
def test_entropy_chunked_equals_unchunked(chunk_size):
    """Non-contiguous logits (a slice) and chunk sizes that do not divide B*T; the gradient
    matches autograd through the naive formula."""
    g = torch.Generator().manual_seed(1)
    full = (torch.randn(3, 6, 11, generator=g) * 2).requires_grad_()
    logits = full[:, 1:]  # (3, 5, 11), not viewable as (15, 11)
    out = entropy_from_logits(logits, chunk_size=chunk_size)
    ref = naive_entropy(logits)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5)
    w = torch.randn(3, 5, generator=g)
    (grad,) = torch.autograd.grad((out * w).sum(), full)
    (grad_ref,) = torch.autograd.grad((ref * w.double()).sum(), full)
    assert torch.allclose(grad, grad_ref.float(), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(entropy_from_logits(logits, chunk_size=chunk_size), out.detach())


def test_entropy_bf16_and_errors():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 50, generator=g).to(torch.bfloat16)
    out = entropy_from_logits(logits, chunk_size=4)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), naive_entropy(logits.float()), atol=1e-5)
    assert entropy_from_logits(torch.zeros(2, 0, 5)).shape == (2, 0)
    with pytest.raises(ValueError, match="B, T, V"):
        entropy_from_logits(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(torch.zeros(1, 2, 3), chunk_size=0)


# ------------------------------------------------------------------------- explained_variance


def test_explained_variance_hand_case(assert_close):
    """R = [1, 2, 3, 4], V = [1, 2, 3, 5]: Var[R] = 1.25; R - V = [0, 0, 0, -1] has mean -0.25
    and biased variance (3·0.0625 + 0.5625) / 4 = 0.1875; EV = 1 - 0.1875 / 1.25 = 0.85.
    The same numbers in two rows with garbage padding."""
    ev = explained_variance(t([1.0, 2.0, 3.0, 5.0]), t([1.0, 2.0, 3.0, 4.0]), torch.ones(1, 4))
    assert ev.ndim == 0
    assert_close(ev, 0.85)
    values = t([1.0, 2.0, float("nan")], [3.0, 5.0, 1e6])
    returns = t([1.0, 2.0, float("inf")], [3.0, 4.0, -7.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert_close(explained_variance(values, returns, mask), 0.85)


def test_explained_variance_perfect_constant_and_degenerate(assert_close):
    """Perfect prediction → 1; predicting the mean 2.5 → 0; constant returns or no valid
    token → 0 (documented choice, never NaN)."""
    r = t([1.0, 2.0, 3.0, 4.0])
    ones = torch.ones(1, 4)
    assert_close(explained_variance(r, r, ones), 1.0)
    assert_close(explained_variance(torch.full_like(r, 2.5), r, ones), 0.0)
    assert_close(explained_variance(r, torch.full_like(r, 3.0), ones), 0.0)
    assert_close(explained_variance(r, r, torch.zeros(1, 4)), 0.0)
    ev = explained_variance(r.requires_grad_(), r + 1, ones)
    assert not ev.requires_grad
