"""No warning that prefl causes knowingly: the frozen reference's eval mode, and the model
summary's "bf16-mixed is not supported". A module in eval mode that prefl did not freeze still
gets Lightning's warning."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch import Trainer

from prefl import DPOModule, PPOModule, PreferenceDataModule
from prefl.training.precision import cpu_has_native_bf16


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
    emulated = not cpu_has_native_bf16()  # this warning tells the user something: it stays
    assert any("on a CPU without native bf16" in m for m in messages) == emulated


def test_a_module_prefl_did_not_freeze_still_warns(tmp_path, sft_dir):
    messages = _fit(tmp_path, sft_dir, extra_eval_module=True)
    assert [m for m in messages if "in eval mode at the start of training" in m]


def _ppo_fit_messages(tmp_path, sft_dir, keep_prefl_filters: bool) -> list[str]:
    """Messages of one PPO rollout on toy prompts (whose data has a validation split); with
    ``keep_prefl_filters`` False the filters that PPOModule installed are reset before ``fit``."""
    data = PreferenceDataModule(mode="prompts", max_length=32, batch_size=2, max_samples=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = PPOModule(
            sft_dir,
            tokenizer="toy",
            reward_fns=["toy"],
            max_new_tokens=4,
            num_samples=2,
            advantage_estimator="rloo",
            log_samples_every=0,
        )
        if not keep_prefl_filters:
            warnings.resetwarnings()
            warnings.simplefilter("always")
        trainer = Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=data)
    return [str(w.message) for w in caught]


def test_ppo_has_no_validation_loop_warning(tmp_path, sft_dir):
    """PPO validates nothing (it is evaluated by sampling), so Lightning's "val_dataloader but
    no validation_step" is silenced; without PPOModule's filter the same fit shows it."""
    unwanted = "You passed in a `val_dataloader` but have no `validation_step`"
    assert not [m for m in _ppo_fit_messages(tmp_path, sft_dir, True) if unwanted in m]
    assert [m for m in _ppo_fit_messages(tmp_path, sft_dir, False) if unwanted in m]
