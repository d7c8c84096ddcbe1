"""The non-finite guard (``prefl/training/guard.py``): NaNs are injected, weights never move.

A forward hook on the policy's ``lm_head`` turns its logits into NaN during chosen batches (a NaN
loss), or a gradient hook turns one parameter's gradient into NaN (a finite loss with a NaN
gradient). The step of such a batch must be skipped: the weights and the AdamW state after it
equal those before it, ``train/nonfinite_steps`` counts it, and the next clean step trains
again. ``max_nonfinite_steps`` consecutive bad steps stop the run with an error naming the step
and the batch. Under DDP the verdict is summed over ranks before anyone steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from prefl import DPOModule, PPOModule, PreferenceDataModule, RewardModule
from prefl.training.guard import NonFiniteError


class Inject(Callback):
    """NaN logits (``kind="loss"``) or a NaN gradient (``kind="grad"``) in ``bad`` batches;
    snapshots of the trainable weights and the optimizer's step count after every batch."""

    def __init__(self, bad: set[int], kind: str = "loss") -> None:
        self.bad, self.kind, self.on = bad, kind, False
        self.snapshots: list[dict] = []

    def on_fit_start(self, trainer, module):
        lm = module.model.model if isinstance(module, RewardModule) else module.model
        head = lm.score if isinstance(module, RewardModule) else lm.lm_head
        head.register_forward_hook(lambda m, i, out: out * math.nan if self._fires("loss") else out)
        self.param = next(p for p in module.parameters() if p.requires_grad)
        self.param.register_hook(lambda g: g * math.nan if self._fires("grad") else g)

    def _fires(self, kind):
        return self.on and self.kind == kind

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.on = batch_idx in self.bad
        if not self.snapshots:
            self.snapshots.append(self._snapshot(trainer, module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.on = False
        self.snapshots.append(self._snapshot(trainer, module))

    @staticmethod
    def _snapshot(trainer, module):
        optimizer = trainer.optimizers[0]
        steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
        weights = [p.detach().clone() for p in module.parameters() if p.requires_grad]
        return {"weights": weights, "adam_steps": steps, "global_step": trainer.global_step}


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"], strict=True))


def _fit(module, mode, callback, tmp_path, steps=4):
    torch.set_num_threads(1)
    data = PreferenceDataModule(
        mode=mode, max_samples=8, batch_size=2, max_length=32, max_prompt_length=16
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_a_nonfinite_step_is_skipped_and_training_goes_on(sft_dir, tmp_path, stage, kind):
    module = DPOModule(sft_dir) if stage == "dpo" else RewardModule(sft_dir)
    inject = Inject({1}, kind)
    trainer = _fit(module, "pairs", inject, tmp_path)
    before, bad, after = inject.snapshots[1], inject.snapshots[2], inject.snapshots[3]
    assert _same(before, bad)  # batch 1: no weight moved
    assert bad["adam_steps"] == before["adam_steps"]  # ... and AdamW's state did not step
    assert not _same(bad, after)  # batch 2 trains again
    assert not _same(inject.snapshots[0], before)  # and batch 0 had trained
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 1.0
    assert all(torch.isfinite(w).all() for w in after["weights"])


def test_consecutive_nonfinite_steps_stop_the_run_naming_step_and_batch(sft_dir, tmp_path):
    module = DPOModule(sft_dir, max_nonfinite_steps=2)
    inject = Inject({1, 2, 3})
    with pytest.raises(NonFiniteError, match=r"3 consecutive .* global step 3, batch 3"):
        _fit(module, "pairs", inject, tmp_path, steps=6)
    assert _same(inject.snapshots[1], inject.snapshots[-1])  # nothing moved after batch 0


def test_max_nonfinite_steps_zero_stops_at_the_first(sft_dir, tmp_path):
    module = DPOModule(sft_dir, max_nonfinite_steps=0)
    with pytest.raises(NonFiniteError, match="1 consecutive"):
        _fit(module, "pairs", Inject({0}), tmp_path)


def test_max_nonfinite_steps_must_not_be_negative(sft_dir):
    with pytest.raises(ValueError, match="max_nonfinite_steps=-1"):
        DPOModule(sft_dir, max_nonfinite_steps=-1)


def test_ppo_skips_a_nonfinite_update(sft_dir, tmp_path):
    """Manual optimisation: the rollout's PPO update with NaN logits leaves the policy as is."""
    module = PPOModule(
        sft_dir,
        reward_fns=["toy"],
        advantage_estimator="rloo",
        num_samples=2,
        max_new_tokens=4,
        ppo_epochs=1,
        no_eos_score=None,
        log_samples_every=0,
    )
    inject = Inject({1})
    original = module.rollout

    def clean_rollout(batch, seed):  # NaN only in the update, not in sampling
        on, inject.on = inject.on, False
        try:
            return original(batch, seed)
        finally:
            inject.on = on

    module.rollout = clean_rollout
    trainer = _fit(module, "prompts", inject, tmp_path, steps=3)
    assert _same(inject.snapshots[1], inject.snapshots[2])
    assert not _same(inject.snapshots[2], inject.snapshots[3])
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 1.0
