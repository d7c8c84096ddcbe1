"""``prefl.training.metrics``: weighted means per stage, and PPO's one-reduction global means."""

from __future__ import annotations

import pytest
import torch

from prefl.training.metrics import StageMetrics, global_means, global_sums


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


class Recorder:
    """Stands in for a LightningModule: records ``log`` / ``log_dict`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, dict]] = []

    def log(self, name, value, **kwargs) -> None:
        self.calls.append((name, value, kwargs))

    def log_dict(self, values, **kwargs) -> None:
        self.calls += [(name, value, kwargs) for name, value in values.items()]


def test_log_passes_the_metric_objects_with_step_values_of_the_batch():
    """Batch 1: (1, 3) -> its own mean 2 is the step value Lightning logs (the metric's forward
    cache); batch 2: 6 -> 6. The epoch value is (1 + 3 + 6) / 3 = 10/3. prog_bar only for the
    names asked for; on_epoch always."""
    metrics = StageMetrics(["loss", "rewards/accuracies"])
    module = Recorder()
    metrics.update("train", {"loss": torch.tensor([1.0, 3.0]), "rewards/accuracies": torch.ones(2)})
    metrics.log(module, "train", on_step=True, prog_bar=["loss"], batch_size=2)
    assert [c[0] for c in module.calls] == ["train/loss", "train/rewards/accuracies"]
    loss_metric, kwargs = module.calls[0][1], module.calls[0][2]
    assert loss_metric._forward_cache.item() == pytest.approx(2.0)
    assert kwargs == dict(on_step=True, on_epoch=True, prog_bar=True, batch_size=2)
    assert module.calls[1][2]["prog_bar"] is False
    metrics.update("train", {"loss": torch.tensor([6.0]), "rewards/accuracies": torch.zeros(1)})
    assert loss_metric._forward_cache.item() == pytest.approx(6.0)
    assert metrics.compute("train")["loss"].item() == pytest.approx(10.0 / 3.0)


def test_log_epoch_derives_logs_once_and_resets():
    """Means loss = (2 + 4) / 2 = 3; ``derive`` adds twice the loss, 6. Both are logged under
    ``val/`` with the given flags and returned; the stage is reset afterwards."""
    metrics = StageMetrics(["loss"])
    module = Recorder()
    metrics.update("val", {"loss": torch.tensor([2.0, 4.0])})
    out = metrics.log_epoch(
        module, "val", lambda m: {**m, "double": 2 * m["loss"]}, prog_bar=True, sync_dist=True
    )
    assert {k: v.item() for k, v in out.items()} == {"loss": 3.0, "double": 6.0}
    assert [(name, value.item()) for name, value, _ in module.calls] == [
        ("val/loss", 3.0),
        ("val/double", 6.0),
    ]
    assert all(kw == dict(prog_bar=True, sync_dist=True) for _, _, kw in module.calls)
    metrics.update("val", {"loss": torch.tensor(8.0)})
    assert metrics.compute("val")["loss"].item() == pytest.approx(8.0)


def test_global_sums_give_the_total_weights_from_the_same_reduction():
    """Weights (1, 1, 0) and, on a second identical rank, the same: totals 2 and 4."""
    values = {"score": (torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 0.0]))}
    for reduce, total in ((None, 2.0), (lambda t: 2 * t, 4.0)):
        means, weights = global_sums(values, reduce)
        assert means["score"].item() == pytest.approx(1.5)
        assert weights["score"].item() == total


def test_log_epoch_of_a_stage_without_batches_logs_nothing():
    """No batch in the epoch (an empty validation split): nothing is computed or logged, so
    torchmetrics' "compute before update" warning never fires."""
    import warnings

    logged = []

    class Module:
        def log_dict(self, values, **kwargs):
            logged.append(values)

    metrics = StageMetrics(["loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.log_epoch(Module(), "val") == {}
    assert logged == []
    metrics.update("val", {"loss": torch.tensor(2.0)})
    assert metrics.log_epoch(Module(), "val") == {"loss": torch.tensor(2.0)}
    assert logged == [{"val/loss": torch.tensor(2.0)}]
