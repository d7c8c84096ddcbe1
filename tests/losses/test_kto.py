"""prefl.losses.kto_loss against its formula, by hand (math module, float64).

Rows: log-ratios ``r = policy − reference = [0.5, −1, 0]``, labels ``[desirable, undesirable,
desirable]``; mismatched pairs with log-ratios ``[0.4, 0.2]``, so ``z = 0.3``.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefl.losses import KTO_LOSSES, kto_loss

POLICY = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
REFERENCE = torch.tensor([-1.5, -1.0, -3.0], dtype=torch.float64)
LABELS = torch.tensor([True, False, True])
KL_POLICY = torch.tensor([-2.0, -1.0], dtype=torch.float64)
KL_REFERENCE = torch.tensor([-2.4, -1.2], dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_losses_rewards_and_reference_point():
    beta = 0.5
    losses, rewards, kl = kto_loss(
        POLICY, REFERENCE, LABELS, KL_POLICY, KL_REFERENCE, beta=beta,
        desirable_weight=2.0, undesirable_weight=1.5,
    )  # fmt: skip
    z = 0.3
    expected = [
        2.0 * (1 - sigmoid(beta * (0.5 - z))),
        1.5 * (1 - sigmoid(beta * (z - (-1.0)))),
        2.0 * (1 - sigmoid(beta * (0.0 - z))),
    ]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.0], abs=1e-12)
    assert float(kl) == pytest.approx(z, abs=1e-12)


def test_a_negative_kl_estimate_is_clamped_at_zero():
    losses, _, kl = kto_loss(POLICY, REFERENCE, LABELS, KL_REFERENCE, KL_POLICY, beta=0.5)
    assert float(kl) == 0.0  # mean log-ratio -0.3
    assert losses[0].item() == pytest.approx(1 - sigmoid(0.25), abs=1e-12)


def test_apo_zero_unpaired_has_no_reference_point():
    losses, _, kl = kto_loss(
        POLICY, REFERENCE, LABELS, KL_POLICY, KL_REFERENCE, beta=0.5,
        loss_type="apo_zero_unpaired",
    )  # fmt: skip
    expected = [1 - sigmoid(0.25), sigmoid(-0.5), 1 - sigmoid(0.0)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12) and float(kl) == 0.0
    assert set(KTO_LOSSES) == {"kto", "apo_zero_unpaired"}


def test_gradients_flow_through_the_rows_only():
    policy = POLICY.clone().requires_grad_()
    kl_policy = KL_POLICY.clone().requires_grad_()
    losses, rewards, kl = kto_loss(policy, REFERENCE, LABELS, kl_policy, KL_REFERENCE, beta=0.5)
    losses.mean().backward()
    assert not kl.requires_grad and not rewards.requires_grad
    assert kl_policy.grad is None
    # d/dr (1 - σ(β(r - z))) = -β σ'(.) for the desirable row 0, over the mean of 3 rows
    s = sigmoid(0.5 * (0.5 - 0.3))
    assert policy.grad[0].item() == pytest.approx(-0.5 * s * (1 - s) / 3, abs=1e-12)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        kto_loss(POLICY, REFERENCE, LABELS, KL_POLICY, KL_REFERENCE, loss_type="ipo")
    with pytest.raises(ValueError, match="differ in shape"):
        kto_loss(POLICY[:2], REFERENCE, LABELS, KL_POLICY, KL_REFERENCE)
