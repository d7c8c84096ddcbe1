"""Long-run health: a few hundred steps of DPO and PPO on the toy task without leaks.

A callback samples the process's resident memory (RSS) and its open file descriptors every 25
training batches. After a warm-up (allocator pools, lazily created buffers, the first checkpoint),
RSS must stay flat: the growth from the first sample after warm-up to the last must stay under
a few MiB — a leak of one batch's tensors per step (the toy batch holds ~10 KiB of ids, a
DPO step's activations ~1 MiB) would exceed it many times over in these runs. The number of open
file descriptors must not grow at all (checkpoints and TensorBoard event files are written
during the run, so leaked handles would show).
"""

from __future__ import annotations

import os

import psutil
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from prefl import DPOModule, PPOModule, PreferenceDataModule

WARMUP, EVERY = 100, 25
RSS_SLACK_MIB = 8.0


class Health(Callback):
    """RSS (MiB) and open file descriptors every ``EVERY`` batches."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, float, int]] = []
        self.process = psutil.Process()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.fit_loop.total_batch_idx + 1
        if step % EVERY == 0:
            rss = self.process.memory_info().rss / 2**20
            self.samples.append((step, rss, len(os.listdir("/proc/self/fd"))))


def _soak(module, mode, steps, tmp_path):
    torch.set_num_threads(1)
    health = Health()
    data = PreferenceDataModule(
        mode=mode, max_samples=64, batch_size=4, max_length=32, max_prompt_length=16
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        log_every_n_steps=10,
        callbacks=[health, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=50)],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    after = [s for s in health.samples if s[0] >= WARMUP]
    assert len(after) >= 4, health.samples
    growth = after[-1][1] - after[0][1]
    assert growth < RSS_SLACK_MIB, f"RSS grew {growth:.1f} MiB: {health.samples}"
    assert max(s[2] for s in after) <= after[0][2], f"file descriptors grew: {health.samples}"
    return health.samples


@pytest.mark.slow
def test_dpo_soak(sft_dir, tmp_path):
    _soak(DPOModule(sft_dir), "pairs", 300, tmp_path)


@pytest.mark.slow
def test_ppo_soak(sft_dir, tmp_path):
    module = PPOModule(
        sft_dir,
        reward_fns=["toy"],
        advantage_estimator="rloo",
        num_samples=2,
        max_new_tokens=8,
        ppo_epochs=1,
        log_samples_every=50,
    )
    _soak(module, "prompts", 200, tmp_path)


class _Leaky(Callback):
    """Keeps 256 KiB per batch alive: the leak the soak test must catch."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.kept.append(torch.ones(2**16))


@pytest.mark.slow
def test_the_soak_check_catches_a_leak(sft_dir, tmp_path, monkeypatch):
    leaky = _Leaky()
    original = Trainer.__init__

    def with_leak(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), leaky]
        original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", with_leak)
    with pytest.raises(AssertionError, match="RSS grew"):
        _soak(DPOModule(sft_dir), "pairs", 300, tmp_path)
