"""Hand-derived checks of the clipped PPO losses in :mod:`prefl.losses.ppo`.

Policy loss, ``ε = 0.2``, per token ``max(-A·ρ, -A·clip(ρ, 0.8, 1.2))`` and its gradient with
respect to ``logprobs`` (``dρ/dlogp = ρ``, so an unclipped token has gradient ``-A·ρ``):

====  =====  ====  ==========  ============  ======  =======  =========
tok   ρ      A     -A·ρ        -A·clip(ρ)    loss    clipped  d/dlogp
====  =====  ====  ==========  ============  ======  =======  =========
0     1.1    2     -2.2        -2.2          -2.2    no       -2.2
1     1.5    2     -3.0        -2.4          -2.4    yes      0
2     0.5    -1    0.5         0.8           0.8     yes      0
3     1.5    -1    1.5         1.2           1.5     no       1.5
4     0.5    2     -1.0        -1.6          -1.0    no       -1.0
====  =====  ====  ==========  ============  ======  =======  =========

Mean loss (-2.2 - 2.4 + 0.8 + 1.5 - 1.0) / 5 = -0.66, clip fraction 2/5. Everything runs in
float64 and is compared with ``atol=1e-6``.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefl.functional import masked_mean
from prefl.losses.ppo import clipped_policy_loss, clipped_value_loss

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
Z = torch.zeros(1, 2)  # inputs of the error cases


def t(*rows, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64, requires_grad=requires_grad)


# ------------------------------------------------------------------------------ policy loss


def test_policy_loss_at_ratio_one(assert_close):
    """logprobs == old: ρ = 1 everywhere, loss = -masked_mean(A) = -(1 - 2 + 4) / 3 = -1,
    gradient -A / 3 on valid tokens; no clipping, approx_kl 0."""
    logp = t([-1.0, -2.0, -0.5, 9.0], requires_grad=True)
    adv = t([1.0, -2.0, 4.0, 100.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, logp.detach().clone(), adv, mask)
    assert_close(loss, -1.0)
    assert_close(loss, -masked_mean(adv, mask))
    assert_close(clip_frac, 0.0)
    assert_close(approx_kl, 0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, [[-1 / 3, 2 / 3, -4 / 3, 0.0]])


def table_inputs(requires_grad: bool = True):
    """The five tokens of the module table plus one garbage padding token."""
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5]
    old = t([-1.0, -2.0, -3.0, -0.5, -1.5, NAN])
    logp = (old + t([math.log(r) for r in ratios] + [0.0])).nan_to_num(INF).detach()
    logp.requires_grad_(requires_grad)
    adv = t([2.0, 2.0, -1.0, -1.0, 2.0, NAN])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return logp, old, adv, mask


def test_policy_loss_clipping_cases(assert_close):
    """The five cases of the module table: loss -0.66, clip fraction 0.4, approx_kl
    = 0.5·mean(ln²1.1, ln²1.5, ln²0.5, ln²1.5, ln²0.5)
    = 0.5·(0.0090840 + 2·0.1644020 + 2·0.4804530) / 5 = 0.1298794;
    gradient [-2.2, 0, 0, 1.5, -1.0] / 5 and exactly 0 on the garbage padding token."""
    logp, old, adv, mask = table_inputs()
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert_close(loss, -0.66)
    assert_close(clip_frac, 0.4)
    assert_close(approx_kl, 0.1298794)
    assert not clip_frac.requires_grad and not approx_kl.requires_grad
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, [[-0.44, 0.0, 0.0, 0.3, -0.2, 0.0]])


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "grad", "clipped"),
    [
        (1.1, 2.0, -2.2, -2.2, 0.0),  # inside the range
        (1.5, 2.0, -2.4, 0.0, 1.0),  # above 1 + ε with A > 0: clipped, constant
        (0.5, -1.0, 0.8, 0.0, 1.0),  # below 1 - ε with A < 0: clipped, constant
        (1.5, -1.0, 1.5, 1.5, 0.0),  # above 1 + ε with A < 0: not clipped
        (0.5, 2.0, -1.0, -1.0, 0.0),  # below 1 - ε with A > 0: not clipped
        (0.9, -1.0, 0.9, 0.9, 0.0),  # inside the range, A < 0
    ],
)
def test_policy_loss_single_token(ratio, adv, loss, grad, clipped, assert_close):
    logp = t([math.log(ratio)], requires_grad=True)
    out, clip_frac, _ = clipped_policy_loss(logp, t([0.0]), t([adv]), torch.ones(1, 1))
    assert_close(out, loss)
    assert_close(clip_frac, clipped)
    (g,) = torch.autograd.grad(out, logp)
    assert_close(g, [[grad]])


def test_policy_loss_num_tokens_micro_batches_add_up(assert_close):
    """Split a random (3, 4) batch into micro-batches of 1 and 2 rows with 3 and 4 valid tokens:
    each divided by the 7 valid tokens of the whole, they sum to the full token mean, in value
    and in gradient (the per-micro-batch means would not)."""
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 4, generator=g, dtype=F64) * 0.3).requires_grad_()
    old = torch.zeros(3, 4, dtype=F64)
    adv = torch.randn(3, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    full, _, _ = clipped_policy_loss(logp, old, adv, mask)
    (grad_full,) = torch.autograd.grad(full, logp)
    n = mask.sum()
    a, _, _ = clipped_policy_loss(logp[:1], old[:1], adv[:1], mask[:1], num_tokens=n)
    b, _, _ = clipped_policy_loss(logp[1:], old[1:], adv[1:], mask[1:], num_tokens=float(n))
    (grad_acc,) = torch.autograd.grad(a + b, logp)
    assert_close(a + b, full.item(), tol=1e-12)
    assert torch.allclose(grad_acc, grad_full, atol=1e-12)
    a_mean, _, _ = clipped_policy_loss(logp[:1], old[:1], adv[:1], mask[:1])
    b_mean, _, _ = clipped_policy_loss(logp[1:], old[1:], adv[1:], mask[1:])
    assert abs((a_mean + b_mean) / 2 - full).item() > 1e-3


@pytest.mark.parametrize(
    ("advantages", "kwargs", "match"),
    [
        (torch.zeros(1, 3), {}, "shape"),
        (Z, {"clip_eps": -0.1}, "clip_eps"),
        (Z, {"num_tokens": 0}, "num_tokens"),
    ],
    ids=["shape", "clip_eps", "num_tokens"],
)
def test_policy_loss_errors(advantages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        clipped_policy_loss(Z, Z, advantages, Z, **kwargs)


# ------------------------------------------------------------------------------- value loss


def test_value_loss_hand_values(assert_close):
    """ε = 0.2, old = 1, R = 2, per token 0.5·max((v - R)², (v_clip - R)²):

    v = 1.1 (inside):  v_clip = 1.1, 0.5·0.81 = 0.405, not clipped, d/dv = v - R = -0.9
    v = 1.5 (towards R, outside): v_clip = 1.2, max(0.25, 0.64) = 0.64 → 0.32, clipped, d/dv = 0
    v = 0.5 (away from R, outside): v_clip = 0.8, max(2.25, 1.44) = 2.25 → 1.125, not clipped,
    d/dv = -1.5

    Mean (0.405 + 0.32 + 1.125) / 3 = 0.6166667, clip fraction 1/3, gradient
    [-0.3, 0, -0.5]; the garbage padding token gets 0.
    """
    values = t([1.1, 1.5, 0.5, INF], requires_grad=True)
    old, returns = t([1.0, 1.0, 1.0, NAN]), t([2.0, 2.0, 2.0, -INF])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_frac = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert_close(loss, 1.85 / 3)
    assert_close(clip_frac, 1 / 3)
    assert not clip_frac.requires_grad
    (grad,) = torch.autograd.grad(loss, values)
    assert_close(grad, [[-0.3, 0.0, -0.5, 0.0]])


def test_value_loss_num_tokens_and_no_clipping_when_at_old(assert_close):
    """values == old: plain 0.5·MSE, (0.5·1 + 0.5·4) / 2 = 1.25, no clipping; with
    ``num_tokens=5`` the masked sum 2.5 is divided by 5."""
    v = t([1.0, 0.0, 3.0])
    returns = t([2.0, 2.0, 0.0])
    mask = torch.tensor([[1, 1, 0]])
    loss, clip_frac = clipped_value_loss(v, v, returns, mask)
    assert_close(loss, 1.25)
    assert_close(clip_frac, 0.0)
    loss, _ = clipped_value_loss(v, v, returns, mask, num_tokens=torch.tensor(5.0))
    assert_close(loss, 0.5)


@pytest.mark.parametrize(
    ("returns", "kwargs", "match"),
    [(torch.zeros(2, 2), {}, "shape"), (Z, {"num_tokens": -1.0}, "num_tokens")],
    ids=["shape", "num_tokens"],
)
def test_value_loss_errors(returns, kwargs, match):
    with pytest.raises(ValueError, match=match):
        clipped_value_loss(Z, Z, returns, Z, **kwargs)
