"""Hand-derived checks of the critic-free advantage estimators in
:mod:`prefl.functional.advantages`.

Groups are consecutive blocks of ``k`` (``repeat_interleave`` order). Worked examples:

* ``k = 2``, returns ``[1, 3 | 2, 6]``: group means ``2`` and ``4``; unbiased stds
  ``sqrt(2) = 1.4142136`` and ``sqrt(8) = 2.8284271``.
* ``k = 3``, returns ``[0, 1, 5 | 2, 2, 2]``: group means ``2`` and ``2``; unbiased variance of
  ``[0, 1, 5]`` is ``(4 + 1 + 9) / 2 = 7`` (std ``sqrt(7) = 2.6457513``), the second group's 0.

Everything runs in float64 and is compared with ``atol=1e-6``.
"""

from __future__ import annotations

import pytest
import torch

from prefl.functional.advantages import ADVANTAGE_ESTIMATORS, grpo, reinforce_baseline, rloo

F64 = torch.float64
TOL = 1e-6
K2 = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=F64)
K3 = torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 2.0], dtype=F64)


def assert_close(actual: torch.Tensor, expected, tol: float = TOL) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=0.0, atol=tol), (
        f"actual={actual.tolist()} expected={expected.tolist()}"
    )


def test_rloo_hand_values():
    """k = 2: the leave-one-out mean is the partner: [1-3, 3-1, 2-6, 6-2] = [-2, 2, -4, 4].
    k = 3: 0 - (1+5)/2 = -3, 1 - (0+5)/2 = -1.5, 5 - (0+1)/2 = 4.5; equal returns → 0.
    Both equal k/(k-1)·(R - mean)."""
    assert_close(rloo(K2, 2), [-2.0, 2.0, -4.0, 4.0])
    assert_close(rloo(K3, 3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    assert_close(rloo(K3, 3), 1.5 * reinforce_baseline(K3, 3))


def test_grpo_hand_values_unbiased_std():
    """eps = 0: k = 2 gives ±1/sqrt(2) = ±0.7071068 and ±2/sqrt(8) = ±0.7071068;
    k = 3 gives [-2, -1, 3] / sqrt(7) = [-0.7559289, -0.3779645, 1.1338934]; a constant group
    gives 0 / (0 + eps) = 0. Default eps = 1e-4: -1 / (1.4142136 + 1e-4) = -0.7070568 and
    [-2, -1, 3] / (2.6457513 + 1e-4) = [-0.7559004, -0.3779502, 1.1338506]."""
    s = 0.7071068
    assert_close(grpo(K2, 2, eps=0.0), [-s, s, -s, s])
    assert_close(grpo(K3, 3), [-0.7559004, -0.3779502, 1.1338506, 0.0, 0.0, 0.0])
    assert_close(grpo(K3[:3], 3, eps=0.0), [-0.7559289, -0.3779645, 1.1338934])
    assert_close(grpo(K2, 2)[:1], [-0.7070568])


def test_reinforce_baseline_hand_values():
    """R - group mean: k = 2 → [-1, 1, -2, 2]; k = 3 → [-2, -1, 3, 0, 0, 0];
    k = 1 → no baseline, the returns themselves (a copy)."""
    assert_close(reinforce_baseline(K2, 2), [-1.0, 1.0, -2.0, 2.0])
    assert_close(reinforce_baseline(K3, 3), [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    out = reinforce_baseline(K2, 1)
    assert_close(out, K2)
    assert out.data_ptr() != K2.data_ptr()


def test_groups_are_consecutive_blocks():
    """[1, 3, 2, 6] with k = 2 groups (1, 3) and (2, 6), not (1, 2) and (3, 6)."""
    assert_close(reinforce_baseline(K2, 2), [-1.0, 1.0, -2.0, 2.0])
    interleaved = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=F64)
    assert_close(reinforce_baseline(interleaved, 2), [-0.5, 0.5, -1.5, 1.5])


@pytest.mark.parametrize("name", ["rloo", "grpo"])
@pytest.mark.parametrize("k", [0, 1])
def test_k_below_two_rejected(name, k):
    with pytest.raises(ValueError, match=">= 2"):
        ADVANTAGE_ESTIMATORS[name](K2, k)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match=">= 1"):
        reinforce_baseline(K2, 0)
    for fn in ADVANTAGE_ESTIMATORS.values():
        with pytest.raises(ValueError, match="not divisible"):
            fn(torch.zeros(5), 2)
        with pytest.raises(ValueError, match="1-D"):
            fn(torch.zeros(2, 2), 2)


def test_name_table():
    assert ADVANTAGE_ESTIMATORS == {
        "rloo": rloo,
        "grpo": grpo,
        "reinforce_baseline": reinforce_baseline,
    }
