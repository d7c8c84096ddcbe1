"""Hand-derived checks of :func:`prefl.losses.bradley_terry_loss` and ``reward_accuracy``.

Notation: ``c``/``r`` the chosen/rejected rewards, ``m`` the margin, ``λ`` the centering
coefficient, ``d = c - r - m``. The per-pair loss is ``-logσ(d) + λ·(c + r)²`` and
``-logσ(d) = log(1 + e^{-d}) = softplus(-d)``. Inputs are picked so that every expected number is
a closed form: with ``L3 = ln 3``, ``σ(L3) = 3/4`` and ``σ(-L3) = 1/4``, hence
``-logσ(L3) = ln(4/3)`` and ``-logσ(-L3) = ln 4``; ``σ(0) = 1/2`` and ``-logσ(0) = ln 2``.
Everything runs in float64 and is compared with ``abs=1e-12`` unless said otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefl.losses import bradley_terry_loss, reward_accuracy

L2 = math.log(2.0)
L3 = math.log(3.0)
L43 = math.log(4.0 / 3.0)  # -logσ(ln 3)
L4 = math.log(4.0)  # -logσ(-ln 3)
TOL = 1e-12
F64 = torch.float64


def t(*values: float, requires_grad: bool = False) -> torch.Tensor:
    """A float64 ``(B,)`` tensor."""
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


def test_hand_values():
    """``d = ln 3 → ln(4/3)``; ``d = 0 → ln 2`` (whatever the common level of the two rewards);
    ``d = -ln 3 → ln 4``. The loss is per pair, shape ``(B,)``, in the rewards' dtype."""
    chosen = t(L3, 0.5, 2.0, -7.0)
    rejected = t(0.0, 0.5, 2.0 + L3, -7.0)
    losses = bradley_terry_loss(chosen, rejected)
    assert losses.shape == (4,)
    assert losses.dtype == F64
    assert losses.tolist() == pytest.approx([L43, L2, L4, L2], abs=TOL)


def test_float32_equal_rewards_give_log2():
    """Equal rewards: ``-logσ(0) = ln 2`` also in float32 (tolerance of float32 rounding)."""
    rewards = torch.tensor([0.0, 1.25, -3.0])
    losses = bradley_terry_loss(rewards, rewards.clone())
    assert losses.dtype == torch.float32
    assert losses.tolist() == pytest.approx([L2] * 3, abs=1e-6)


def test_swapping_chosen_and_rejected_flips_the_difference():
    """Swapping turns ``d`` into ``-d``: ``ln(4/3)`` becomes ``ln 4`` for ``d = ln 3``. In general
    ``softplus(d) - softplus(-d) = log((1 + e^d) / (1 + e^{-d})) = log(e^d) = d``, so
    ``loss(r, c) - loss(c, r) = c - r`` pair by pair."""
    chosen, rejected = t(L3, 1.0, -0.5, 4.0), t(0.0, 3.0, 0.25, -1.0)
    forward = bradley_terry_loss(chosen, rejected)
    swapped = bradley_terry_loss(rejected, chosen)
    assert forward[0].item() == pytest.approx(L43, abs=TOL)
    assert swapped[0].item() == pytest.approx(L4, abs=TOL)
    diff = (chosen - rejected).tolist()
    assert (swapped - forward).tolist() == pytest.approx(diff, abs=TOL)


def test_margin_is_subtracted_from_the_difference():
    """``d = c - r - m``. With ``c = ln 3 + m``, ``r = 0``: ``d = ln 3`` → ``ln(4/3)``, for any
    ``m``; equal rewards with ``m = ln 3`` give ``d = -ln 3`` → ``ln 4``; ``m = 0`` is the same as
    no margin. A float32 margin is cast to the rewards' dtype."""
    m = 0.7
    chosen, rejected = t(L3 + m, 1.0, L3 + 0.2), t(0.0, 1.0, 0.2)
    margin = torch.tensor([m, L3, 0.0], dtype=torch.float32)
    losses = bradley_terry_loss(chosen, rejected, margin)
    assert losses.dtype == F64
    # float32 margins carry float32 rounding (|Δm| ≤ 6e-8), hence abs=1e-7 here
    assert losses.tolist() == pytest.approx([L43, L4, L43], abs=1e-7)
    exact = bradley_terry_loss(chosen, rejected, t(m, L3, 0.0))
    assert exact.tolist() == pytest.approx([L43, L4, L43], abs=TOL)
    no_margin = bradley_terry_loss(chosen, rejected)
    assert exact[2].item() == pytest.approx(no_margin[2].item(), abs=TOL)
    assert no_margin[0].item() == pytest.approx(math.log1p(math.exp(-(L3 + m))), abs=TOL)


def test_negative_margin_relaxes_the_requirement():
    """``c = r`` with ``m = -ln 3``: ``d = ln 3`` → ``ln(4/3) < ln 2``."""
    losses = bradley_terry_loss(t(0.3), t(0.3), t(-L3))
    assert losses.item() == pytest.approx(L43, abs=TOL)


def test_center_rewards_term_per_pair_and_batch_mean():
    """λ = 0.1, c = (1, 2, ln 3), r = (0.5, -3, 0):
    pair terms ``λ·(c + r)² = 0.1·(2.25, 1, (ln 3)²)`` on top of ``-logσ(c - r)``, and the batch
    mean of the extra term is ``λ·mean((c + r)²) = 0.1·(2.25 + 1 + (ln 3)²) / 3``."""
    lam = 0.1
    chosen, rejected = t(1.0, 2.0, L3), t(0.5, -3.0, 0.0)
    plain = bradley_terry_loss(chosen, rejected)
    centred = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=lam)
    extra = [lam * 2.25, lam * 1.0, lam * L3**2]
    assert (centred - plain).tolist() == pytest.approx(extra, abs=TOL)
    assert centred[2].item() == pytest.approx(L43 + lam * L3**2, abs=TOL)
    batch_extra = lam * (2.25 + 1.0 + L3**2) / 3
    assert (centred.mean() - plain.mean()).item() == pytest.approx(batch_extra, abs=TOL)
    expected = lam * ((chosen + rejected) ** 2).mean()
    assert (centred.mean() - plain.mean()).item() == pytest.approx(expected.item(), abs=TOL)
    zero = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.0)
    assert torch.equal(zero, plain)


def test_centering_with_a_margin():
    """Both terms together: c = ln 3 + 1, r = 0, m = 1 → d = ln 3, c + r = ln 3 + 1;
    the margin enters only the first term: loss = ln(4/3) + λ·(ln 3 + 1)² with λ = 0.5."""
    losses = bradley_terry_loss(t(L3 + 1.0), t(0.0), t(1.0), center_rewards_coefficient=0.5)
    assert losses.item() == pytest.approx(L43 + 0.5 * (L3 + 1.0) ** 2, abs=TOL)


def test_gradients_by_hand():
    """``∂/∂c [-logσ(c - r)] = -σ(-(c - r))`` and ``∂/∂r = +σ(-(c - r))``. For c = ln 3, r = 0:
    ``σ(-ln 3) = 1/4``, so the gradients are ``-1/4`` and ``+1/4``. With λ = 0.5 the centering
    term adds ``2λ(c + r) = ln 3`` to both: ``-1/4 + ln 3`` and ``1/4 + ln 3``. The second pair
    (c = r = 0, λ = 0) gets ``∓σ(0) = ∓1/2``; a pair's gradient does not leak into the other."""
    chosen, rejected = t(L3, 0.0, requires_grad=True), t(0.0, 0.0, requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    assert chosen.grad.tolist() == pytest.approx([-0.25, -0.5], abs=TOL)
    assert rejected.grad.tolist() == pytest.approx([0.25, 0.5], abs=TOL)

    chosen, rejected = t(L3, requires_grad=True), t(0.0, requires_grad=True)
    bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.5).sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.25 + L3, abs=TOL)
    assert rejected.grad.item() == pytest.approx(0.25 + L3, abs=TOL)


def test_gradient_with_a_margin():
    """With a margin the gradient is ``-σ(-d)`` at ``d = c - r - m``: c = 1 + ln 3, r = 0, m = 1
    → ``d = ln 3`` → ``∂/∂c = -1/4``; the margin gets ``+1/4`` when it requires grad."""
    chosen = t(1.0 + L3, requires_grad=True)
    margin = t(1.0, requires_grad=True)
    bradley_terry_loss(chosen, t(0.0), margin).sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.25, abs=TOL)
    assert margin.grad.item() == pytest.approx(0.25, abs=TOL)


def test_reward_accuracy_is_strict():
    """1 where ``c > r`` strictly; ties (also of equal large values) count as 0; float32 out."""
    chosen = torch.tensor([1.0, 0.0, 2.0, -1.0, 5.0], dtype=F64)
    rejected = torch.tensor([0.0, 0.0, 2.0, 3.0, 5.0 - 1e-9], dtype=F64)
    accuracy = reward_accuracy(chosen, rejected)
    assert accuracy.dtype == torch.float32
    assert accuracy.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert accuracy.mean().item() == pytest.approx(0.4, abs=1e-7)
    ties = torch.full((3,), 0.25)
    assert reward_accuracy(ties, ties.clone()).tolist() == [0.0, 0.0, 0.0]
