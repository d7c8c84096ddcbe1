"""No warning that prefl causes knowingly: the frozen reference's eval mode, and the model
summary's "bf16-mixed is not supported". A module in eval mode that prefl did not freeze still
gets Lightning's warning."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch import Trainer

from prefl import DPOModule, PreferenceDataModule


def _fit(tmp_path, sft_dir, extra_eval_module: bool) -> list[str]:
    torch.manual_seed(0)
    module = DPOModule(sft_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), lr_scheduler=None)
    if extra_eval_module:  # a trainable layer the user left in eval mode
        module.user_head = torch.nn.Linear(2, 2).eval()
    data = PreferenceDataModule(
        mode="pairs", max_length=32, max_prompt_length=16, batch_size=4, max_samples=8
    )
    trainer = Trainer(
        max_steps=1,
        precision="bf16-mixed",
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    return [str(w.message) for w in caught]


def test_a_dpo_run_in_bf16_mixed_has_neither_warning(tmp_path, sft_dir):
    messages = _fit(tmp_path, sft_dir, extra_eval_module=False)
    assert not [m for m in messages if "in eval mode at the start of training" in m]
    assert not [m for m in messages if "is not supported by the model summary" in m]


def test_a_module_prefl_did_not_freeze_still_warns(tmp_path, sft_dir):
    messages = _fit(tmp_path, sft_dir, extra_eval_module=True)
    assert [m for m in messages if "in eval mode at the start of training" in m]
