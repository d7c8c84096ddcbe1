"""``prefl.training.metrics``: weighted means per stage, and PPO's one-reduction global means."""

from __future__ import annotations

import pytest
import torch

from prefl.training.metrics import StageMetrics, global_means


def test_stage_metrics_weigh_rows_and_skip_padding_repeats():
    """Batch 1: losses (1, 3) with weights (1, 0) -> only 1 counts; batch 2: 5 with weight 1.
    The mean is (1 + 5) / 2 = 3. A value of twice the weights' length (chosen then rejected)
    takes each pair's weight twice: (2, 4, 6, 8) with (1, 0) -> (2 + 6) / 2 = 4."""
    metrics = StageMetrics(["loss", "rewards/both"])
    metrics.update("train", {"loss": torch.tensor([1.0, 3.0])}, torch.tensor([1.0, 0.0]))
    metrics.update("train", {"loss": torch.tensor([5.0])}, torch.tensor([1.0]))
    metrics.update(
        "train", {"rewards/both": torch.tensor([2.0, 4.0, 6.0, 8.0])}, torch.tensor([1.0, 0.0])
    )
    out = metrics.compute("train")
    assert out["loss"].item() == pytest.approx(3.0)
    assert out["rewards/both"].item() == pytest.approx(4.0)
    metrics.update("train", {"loss": torch.tensor([7.0])})
    assert metrics.compute("train")["loss"].item() == pytest.approx(7.0)  # reset after compute


def test_stage_metrics_keep_stages_apart():
    metrics = StageMetrics(["loss"])
    metrics.update("train", {"loss": torch.tensor(2.0)})
    metrics.update("val", {"loss": torch.tensor(6.0)})
    assert metrics.compute("val", reset=False)["loss"].item() == 6.0
    assert metrics.compute("train")["loss"].item() == 2.0


def test_global_means_hand_values_and_one_reduction():
    """Per response: scores (1, 2, 4) with weights (1, 1, 0) -> 1.5; per token: values
    ((1, 3), (5, 7)) under mask ((1, 1), (1, 0)) -> (1 + 3 + 5) / 3 = 3. The reduction is
    called once, on the 4 stacked sums; doubling them (a second, identical rank) changes
    nothing."""
    calls = []

    def twice(t):
        calls.append(t.shape)
        return 2 * t

    values = {
        "score": (torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 0.0])),
        "value": (torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [1, 0]])),
    }
    for reduce in (None, twice):
        out = global_means(values, reduce)
        assert out["score"].item() == pytest.approx(1.5)
        assert out["value"].item() == pytest.approx(3.0)
    assert calls == [torch.Size([4])]
