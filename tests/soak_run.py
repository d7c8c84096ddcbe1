"""One soak run for ``test_soak.py``, in a fresh process so that RSS means something (a long
pytest process reuses memory freed by earlier tests, which would hide a leak).

argv: out dir, SFT export, ``dpo`` or ``ppo``, steps, ``leak`` or ``clean``. Prints one JSON
line: the ``(step, RSS MiB, open file descriptors)`` samples taken every 25 batches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from prefl import DPOModule, PPOModule, PreferenceDataModule

EVERY = 25


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


class Leak(Callback):
    """Keeps 256 KiB per batch alive: the leak the soak test must catch."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.kept.append(torch.ones(2**16))


def main(out: Path, sft: str, kind: str, steps: int, leak: bool) -> None:
    torch.set_num_threads(1)
    if kind == "dpo":
        module, mode = DPOModule(sft), "pairs"
    else:
        module, mode = (
            PPOModule(
                sft,
                reward_fns=["toy"],
                advantage_estimator="rloo",
                num_samples=2,
                max_new_tokens=8,
                ppo_epochs=1,
                log_samples_every=50,
            ),
            "prompts",
        )
    health = Health()
    callbacks = [health, ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=50)]
    data = PreferenceDataModule(
        mode=mode, max_samples=64, batch_size=4, max_length=32, max_prompt_length=16
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=TensorBoardLogger(out, name="tb"),
        log_every_n_steps=10,
        callbacks=[*callbacks, *([Leak()] if leak else [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=data)
    print(json.dumps(health.samples))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "leak")
