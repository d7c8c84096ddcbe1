"""KTOModule on the toy pairs read as unpaired rows: the step-0 loss, the loss against
``kto_loss`` on the module's own log-probs, every option changing the loss, precomputed
reference log-probs, LoRA, and learning (desirable rewards above undesirable ones)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything

from prefl import KTOModule, PreferenceDataModule
from prefl.losses import kto_loss
from prefl.models import CausalLMSpec, LoraSpec


def data(n: int = 8, batch_size: int = 8) -> PreferenceDataModule:
    return PreferenceDataModule(
        mode="unpaired", max_samples=n, batch_size=batch_size, max_length=32, max_prompt_length=16
    )


@pytest.fixture(scope="module")
def trainer(quiet_trainer):
    """The quiet CPU ``Trainer`` factory of ``tests/conftest.py``."""
    return quiet_trainer


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def val_batch(dm: PreferenceDataModule) -> dict:
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


def built(sft_dir, **kw) -> KTOModule:
    seed_everything(0)
    module = KTOModule(sft_dir, "toy", optimizer=sgd, lr_scheduler=None, **kw)
    module.configure_model()
    return module


def test_step_zero_loss_is_one_half(sft_dir):
    """Policy = reference: every log-ratio and ``z`` are 0, so each loss is ``1 − σ(0)``."""
    module = built(sft_dir, desirable_weight=1.0, undesirable_weight=1.0)
    with torch.no_grad():
        assert float(module.terms(val_batch(data()))["losses"].mean()) == pytest.approx(
            0.5, abs=1e-6
        )


def test_the_loss_is_kto_loss_of_the_module_log_probs(sft_dir, tmp_path, trainer):
    """After two SGD steps the validation loss equals ``kto_loss`` on the policy's and the
    reference's log-probs of the same rows (z from the mismatched completions)."""
    module = built(sft_dir, beta=0.5, desirable_weight=1.5)
    dm = data(n=8, batch_size=8)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=dm)
    batch = val_batch(dm)
    with torch.no_grad():
        got = float(module.terms(batch)["losses"].mean())
        policy = module(batch)
        policy_kl = module._logps(module.model, batch, "kl_")
        reference, reference_kl = module.reference_logps(batch)
    losses, rewards, z = kto_loss(
        policy, reference, batch["label"], policy_kl, reference_kl, beta=0.5, desirable_weight=1.5
    )
    assert got == pytest.approx(float(losses.mean()), abs=1e-6)
    assert float(z) > 0 and float(rewards.abs().max()) > 0.01


@pytest.mark.parametrize(
    "kw", [{"beta": 0.5}, {"desirable_weight": 2.0}, {"undesirable_weight": 2.0}]
)
def test_every_option_changes_the_loss(kw, sft_dir, tmp_path, trainer):
    losses = {}
    for name, settings in {"default": {}, "changed": kw}.items():
        module = built(sft_dir, **settings)
        dm = data()
        trainer(tmp_path / name, max_steps=2, limit_val_batches=0).fit(module, datamodule=dm)
        with torch.no_grad():
            losses[name] = float(module.terms(val_batch(dm))["losses"].mean())
    assert abs(losses["changed"] - losses["default"]) > 1e-4


def test_apo_zero_unpaired_drops_the_reference_point(sft_dir):
    """With precomputed reference log-probs 1 nat below the policy's on every mismatched
    completion, ``kto``'s reference point is exactly 1 and ``apo_zero_unpaired``'s 0; the two
    losses (equal where ``z`` is 0) then differ."""
    module = built(sft_dir)
    batch = val_batch(data())
    with torch.no_grad():
        batch["ref_logps"] = module.reference_logps(batch)[0] + 0.3
        batch["ref_kl_logps"] = module._logps(module.model, batch, "kl_") - 1.0
        kto = module.terms(batch)
        module.loss_type = "apo_zero_unpaired"
        apo = module.terms(batch)
    assert float(kto["kl"]) == pytest.approx(1.0, abs=1e-5) and float(apo["kl"]) == 0.0
    assert (kto["losses"] - apo["losses"]).abs().max() > 1e-3


def test_precomputed_reference_gives_the_live_reference_numbers(sft_dir, tmp_path, trainer):
    metrics = {}
    for precompute in (False, True):
        module = built(sft_dir, precompute_ref_logps=precompute)
        t = trainer(tmp_path / str(precompute), max_epochs=1)
        t.fit(module, datamodule=data(n=8, batch_size=4))
        metrics[precompute] = {k: float(v) for k, v in t.callback_metrics.items()}
        assert (module.reference is None) == precompute
    for key, value in metrics[False].items():
        assert metrics[True][key] == pytest.approx(value, abs=1e-5), key


def test_lora_kto_trains_adapters_against_the_base(sft_dir, tmp_path, trainer):
    seed_everything(0)
    spec = CausalLMSpec(name_or_path=sft_dir, lora=LoraSpec(r=4, alpha=8))
    module = KTOModule(spec, "toy", optimizer=sgd, lr_scheduler=None)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=data())
    assert module.reference is None
    with torch.no_grad():
        batch = val_batch(data())
        assert (module(batch) - module.reference_logps(batch)[0]).abs().max() > 1e-4


def test_kto_learns_the_labels(sft_dir, tmp_path, trainer):
    """Four epochs over 32 toy pairs read as 64 rows: desirable rows' implicit rewards end
    above the undesirable ones' on the held-out rows."""
    module = built(sft_dir, beta=0.1)
    t = trainer(tmp_path, max_epochs=4)
    t.fit(module, datamodule=data(n=32, batch_size=16))
    chosen, rejected = (
        float(t.callback_metrics[f"val/rewards/{k}"]) for k in ("chosen", "rejected")
    )
    assert chosen - rejected > 0.05, (chosen, rejected)
