"""Metric logging shared by the four modules: weighted means that are exact across batches and
data-parallel ranks.

:class:`StageMetrics` keeps one ``torchmetrics.MeanMetric`` per stage (``train`` / ``val``) and
name, updated with per-row (or per-token) weights, so the data-parallel sampler's padding repeats
(weight 0) never count and a rank with more tokens weighs more. Two ways to log them: the metric
objects themselves through ``LightningModule.log`` (:meth:`StageMetrics.log`: a step value per
batch, and the epoch value reduced over ranks by torchmetrics), or the epoch's means, computed
once and turned into the logged values by the module (:meth:`StageMetrics.log_epoch`: SFT's
perplexity, the reward model's std). :func:`global_means` is
the one-shot form PPO needs at every step: the exact means over every rank's values, with a single
``all_reduce`` of the weighted sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric


def _key(stage: str, name: str) -> str:
    return f"{stage}_{name.replace('/', '_')}"


class StageMetrics(torch.nn.Module):
    """Weighted running means of named values, per stage.

    Args:
        names: The metric names (``"loss"``, ``"rewards/chosen"``...); logged as
            ``<stage>/<name>``.
        stages: The stages to keep them for.
    """

    def __init__(self, names: Iterable[str], stages: Iterable[str] = ("train", "val")) -> None:
        super().__init__()
        self.names = list(names)
        self.stages = list(stages)
        self.means = torch.nn.ModuleDict(
            {_key(stage, name): MeanMetric() for stage in self.stages for name in self.names}
        )

    def update(
        self,
        stage: str,
        values: Mapping[str, torch.Tensor],
        weights: torch.Tensor | float | None = None,
    ) -> None:
        """Add one batch: each value ``(N,)`` (or a scalar) with ``weights`` ``(N,)`` (or one
        weight for all; None = 1). A value ``k`` times as long as ``weights`` (chosen then
        rejected) takes each weight ``k`` times. Values are detached.

        Each metric is called (its ``forward``): the running state grows exactly as with
        ``update``, and the batch's own mean is kept for :meth:`log`'s step values.
        """
        for name, value in values.items():
            value = value.detach()
            weight = 1.0 if weights is None else weights
            if torch.is_tensor(weight) and weight.numel() != value.numel():
                weight = weight.repeat(value.numel() // weight.numel())  # e.g. chosen + rejected
            self.means[_key(stage, name)](value.flatten().float(), weight)

    def log(
        self,
        module: LightningModule,
        stage: str,
        *,
        on_step: bool,
        prog_bar: Iterable[str] = (),
        batch_size: int | None = None,
    ) -> None:
        """Log every metric of ``stage`` through ``module.log`` (epoch values are reduced over
        ranks by torchmetrics; step values are this rank's)."""
        bar = set(prog_bar)
        for name in self.names:
            module.log(
                f"{stage}/{name}",
                self.means[_key(stage, name)],
                on_step=on_step,
                on_epoch=True,
                prog_bar=name in bar,
                batch_size=batch_size,
            )

    def compute(self, stage: str, reset: bool = True) -> dict[str, torch.Tensor]:
        """The epoch's means of ``stage`` over every batch and rank (then reset, by default)."""
        out = {name: self.means[_key(stage, name)].compute() for name in self.names}
        if reset:
            for name in self.names:
                self.means[_key(stage, name)].reset()
        return out

    def log_epoch(
        self,
        module: LightningModule,
        stage: str,
        derive: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        *,
        prog_bar: bool = False,
        sync_dist: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Compute (and reset) the epoch's means of ``stage`` and log them as ``<stage>/<name>``
        through ``module.log_dict`` (once, at the epoch's end).

        Args:
            module: The module that logs.
            stage: The stage (``"train"``, ``"val"``).
            derive: Turns the means (by name) into the values to log; None = log the means.
            prog_bar: Show them in the progress bar.
            sync_dist: Passed to ``log_dict`` (the means are already reduced over ranks).

        Returns:
            The logged values by name (without the stage prefix); nothing (and nothing logged)
            when the stage saw no batch this epoch (e.g. an empty validation split).
        """
        if all(self.means[_key(stage, name)].update_count == 0 for name in self.names):
            return {}
        means = self.compute(stage)
        out = means if derive is None else derive(means)
        module.log_dict(
            {f"{stage}/{name}": value for name, value in out.items()},
            prog_bar=prog_bar,
            sync_dist=sync_dist,
        )
        return out


def global_means(
    values: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact weighted means over every data-parallel rank, with one reduction.

    Args:
        values: name -> ``(value, weight)``, tensors of the same shape (``(N,)`` per response, or
            ``(N, T)`` per token with the mask as weight).
        reduce: Sums a 1-D tensor over ranks (e.g. the strategy's ``reduce`` with
            ``reduce_op="sum"``); None = this process only.

    Returns:
        name -> ``sum(value · weight) / sum(weight)`` over every rank (0 where no weight).
    """
    return global_sums(values, reduce)[0]


def global_sums(
    values: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`global_means` and, from the same single reduction, each name's total weight over
    every rank (e.g. the number of real responses, for ``batch_size`` and a KL controller).

    Returns:
        ``(means, weights)``: name -> the weighted mean, and name -> ``sum(weight)`` over ranks.
    """
    sums = [(v.float() * w).sum() for v, w in values.values()]
    sums += [w.float().sum() for _, w in values.values()]
    totals = torch.stack(sums)
    if reduce is not None:
        totals = reduce(totals)
    n = len(values)
    means = {name: totals[i] / totals[n + i].clamp(min=1e-12) for i, name in enumerate(values)}
    return means, {name: totals[n + i] for i, name in enumerate(values)}
