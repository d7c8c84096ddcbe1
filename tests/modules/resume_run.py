"""One toy training run for ``test_resume.py``: ``run()`` in-process, or, as a script, a run
that kills itself with SIGKILL after optimizer step ``KILL_AT`` (argv: out, sft, kind, kill_at).

Every kind trains 2 epochs on the toy task with AdamW and (except PPO) the warmup + cosine
schedule, and checkpoints every 2 optimizer steps (PPO: 4, i.e. every 2 rollouts; ``save_last``,
all kept). ``run`` returns the
end state: global step, epoch, every logged metric and every trainable weight.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from prefl import (
    DPOModule,
    OnlineDPOModule,
    PPOModule,
    PreferenceDataModule,
    RewardModule,
    SFTModule,
)
from prefl.training.schedules import WarmupCosineLR


class KillAt(Callback):
    """SIGKILL this process right after optimizer step ``step`` (no cleanup, no final save)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build(kind: str, sft: str) -> tuple[Any, str, int]:
    """The module, the data mode and the samples per run (6 batches of 2 per epoch; PPO 4)."""
    schedule = lambda opt: WarmupCosineLR(opt, warmup_ratio=0.2)  # noqa: E731
    if kind == "sft":
        return SFTModule(sft, lr_scheduler=schedule), "sft", 12
    if kind == "dpo":
        return DPOModule(sft, lr_scheduler=schedule), "pairs", 12
    if kind == "reward":
        return RewardModule(sft, lr_scheduler=schedule), "pairs", 12
    if kind == "online_dpo":  # samples seeded by (run, epoch, batch, rank): a resume re-samples
        module = OnlineDPOModule(
            sft, reward_fns=["toy"], num_samples=2, max_new_tokens=6, lr_scheduler=schedule
        )
        return module, "prompts", 12
    module = PPOModule(
        sft,
        reward_fns=["toy"],
        num_samples=2,
        max_new_tokens=6,
        advantage_estimator="gae",
        kl_target=0.5,  # adaptive: the controller's state matters
        kl_horizon=100,
        ppo_epochs=1,
        log_samples_every=0,
    )
    return module, "prompts", 8


def run(out: Path, sft: str, kind: str, ckpt: str | None = None, kill_at: int | None = None):
    """Train (or resume from ``ckpt``) and return the end state."""
    torch.set_num_threads(1)
    seed_everything(0)
    module, mode, samples = build(kind, sft)
    data = PreferenceDataModule(
        mode=mode, max_samples=samples, batch_size=2, max_length=32, max_prompt_length=16
    )
    every = 4 if kind == "ppo" else 2  # PPO with GAE: 2 optimizer steps per rollout
    checkpoints = ModelCheckpoint(
        dirpath=Path(out) / "checkpoints", every_n_train_steps=every, save_last=True, save_top_k=-1
    )
    callbacks: list[Callback] = [checkpoints]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        num_sanity_val_steps=0,
        logger=False,
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "weights": weights,
    }


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3], kill_at=int(sys.argv[4]))
