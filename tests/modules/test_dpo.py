"""DPOModule: reference handling, checkpoints, precompute, LoRA, accumulation, TR-DPO."""

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from prefl import CausalLMSpec, DPOModule, PreferenceDataModule
from prefl.data import load_tokenizer
from prefl.models import LoraSpec, build_causal_lm


def data(n=32, batch_size=8, **kw):
    dm = PreferenceDataModule(
        mode="pairs",
        max_samples=n,
        batch_size=batch_size,
        max_length=32,
        max_prompt_length=16,
        **kw,
    )
    return dm


def trainer(tmp_path, **kw):
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    return Trainer(**{**defaults, **kw})


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def test_reference_is_frozen_untouched_and_outside_the_optimizer(sft_dir, tmp_path):
    module = DPOModule(sft_dir, optimizer=sgd(0.5))
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(module, datamodule=data())
    initial = build_causal_lm(sft_dir, module.tokenizer).state_dict()
    for key, value in module.reference.state_dict().items():
        assert torch.equal(value, initial[key]), key  # bit-identical
    assert not module.reference.training
    assert all(not p.requires_grad for p in module.reference.parameters())
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in module.reference.parameters()}
    changed = any(not torch.equal(p, initial[k]) for k, p in module.model.state_dict().items())
    assert changed  # the policy did move


def test_policy_equals_reference_at_start_gives_log2(sft_dir, tmp_path):
    module = DPOModule(sft_dir)
    t = trainer(tmp_path)
    t.validate(module, datamodule=data())
    assert t.callback_metrics["val/loss"].item() == pytest.approx(math.log(2), abs=1e-5)
    assert t.callback_metrics["val/rewards/accuracies"].item() == 0.0  # strict >, ties
    assert t.callback_metrics["val/rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)


def test_checkpoint_has_no_reference_and_resumes(sft_dir, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    seed_everything(0)
    module = DPOModule(sft_dir, optimizer=sgd())
    t = trainer(
        tmp_path,
        max_steps=2,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )
    t.fit(module, datamodule=data())
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("reference.")]
    assert any(k.startswith("model.") for k in state)
    resumed = DPOModule(sft_dir, optimizer=sgd())
    t2 = trainer(tmp_path, max_steps=4, limit_val_batches=0)
    t2.fit(resumed, datamodule=data(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert t2.global_step == 4
    initial = build_causal_lm(sft_dir, resumed.tokenizer).state_dict()
    for key, value in resumed.reference.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_random_init_source_keeps_the_reference_in_checkpoints(tmp_path):
    module = DPOModule(CausalLMSpec(config="toy"), optimizer=sgd())
    module.tokenizer = load_tokenizer("toy")
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert any(k.startswith("reference.") for k in checkpoint["state_dict"])


def test_precomputed_and_on_the_fly_reference_give_the_same_loss(sft_dir, tmp_path):
    results = {}
    for precompute in (False, True):
        module = DPOModule(sft_dir, precompute_ref_logps=precompute, optimizer=sgd())
        dm = data()
        t = trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0)
        seed_everything(0)
        t.fit(module, datamodule=dm)
        results[precompute] = {k: v.item() for k, v in t.callback_metrics.items()}
        if precompute:
            assert module.reference is None  # freed after the pass
            assert "ref_chosen_logps" in dm.datasets["train"].column_names
            assert "ref_chosen_logps" in dm.datasets["validation"].column_names
    for key in ("val/loss", "val/rewards/chosen", "val/rewards/margins", "train/loss_epoch"):
        assert results[True][key] == pytest.approx(results[False][key], abs=1e-5), key


def test_lora_reference_is_the_base_model(sft_dir, tmp_path):
    module = DPOModule(CausalLMSpec(name_or_path=sft_dir, lora=LoraSpec(r=4)), optimizer=sgd(1.0))
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    dm = data()
    t.fit(module, datamodule=dm)
    assert module.reference is None  # no second copy
    base = build_causal_lm(sft_dir, module.tokenizer).eval()
    batch = next(iter(dm.val_dataloader()))
    ref_c, ref_r = module.reference_logps(batch)
    with torch.no_grad():
        expected = DPOModule._pair_logps(base, batch)
    torch.testing.assert_close(ref_c, expected["chosen_logps"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_r, expected["rejected_logps"], rtol=0, atol=1e-5)
    with torch.no_grad():
        policy = module(batch)
    assert not torch.allclose(policy["chosen_logps"], ref_c)  # adapters trained


def test_four_micro_batches_with_accumulation_equal_one_batch_of_four(sft_dir, tmp_path):
    params = {}
    for batch_size, accumulate in ((4, 1), (1, 4)):
        seed_everything(0)
        module = DPOModule(sft_dir, optimizer=sgd(1.0), lr_scheduler=None, nll_weight=0.5)
        t = trainer(tmp_path, max_steps=1, limit_val_batches=0, accumulate_grad_batches=accumulate)
        t.fit(module, datamodule=data(n=4, batch_size=batch_size))
        params[batch_size] = module.model.state_dict()
    initial = build_causal_lm(sft_dir, load_tokenizer("toy")).state_dict()
    moved = 0.0
    for key, value in params[4].items():
        torch.testing.assert_close(params[1][key], value, rtol=0, atol=2e-6)
        moved = max(moved, (value - initial[key]).abs().max().item())
    assert moved > 1e-3  # the step was real


def test_tr_dpo_moves_the_reference_towards_the_policy(sft_dir, tmp_path):
    module = DPOModule(
        sft_dir, ref_sync_every=1, ref_mixup_alpha=0.25, optimizer=sgd(1.0), lr_scheduler=None
    )
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(module, datamodule=data())
    initial = build_causal_lm(sft_dir, module.tokenizer).state_dict()
    policy = module.model.state_dict()
    for key, value in module.reference.state_dict().items():
        torch.testing.assert_close(value, 0.25 * policy[key] + 0.75 * initial[key])
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # a moved reference must be saved
    assert any(k.startswith("reference.") for k in checkpoint["state_dict"])


def test_reference_free_loss_builds_no_reference(sft_dir, tmp_path):
    module = DPOModule(sft_dir, loss_type="simpo", beta=2.0)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(module, datamodule=data())
    assert module.reference is None


def test_mixture_logs_each_term(sft_dir, tmp_path):
    module = DPOModule(
        sft_dir, loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], nll_weight=1.0
    )
    t = trainer(tmp_path)
    t.validate(module, datamodule=data())
    m = {k: v.item() for k, v in t.callback_metrics.items()}
    expected = 0.8 * m["val/loss/sigmoid"] + 0.2 * m["val/loss/bco_pair"] + m["val/loss/nll"]
    assert m["val/loss"] == pytest.approx(expected, abs=1e-5)
    assert m["val/loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-5)


def test_dropout_is_disabled(tmp_path):
    spec = CausalLMSpec(
        config={
            **dict(
                model_type="llama",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=64,
            ),
            "attention_dropout": 0.5,
        }
    )
    module = DPOModule(spec, tokenizer="toy")
    module.configure_model()
    for m in module.model.modules():
        assert getattr(m, "attention_dropout", 0.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "nope"}, "model.loss_type"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "model.loss_weights"),
        ({"beta": 0.0}, "model.beta"),
        ({"label_smoothing": 0.5}, "model.label_smoothing"),
        ({"precompute_ref_logps": True, "ref_sync_every": 10}, "model.ref_sync_every"),
    ],
)
def test_bad_settings_name_the_config_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOModule("unused", **kwargs)


def test_sample_report_against_the_reference_at_start_is_zero(sft_dir, tmp_path):
    from prefl import SampleReport

    module = DPOModule(sft_dir)
    module.tokenizer = load_tokenizer(sft_dir)
    module.configure_model()
    report = SampleReport(num_samples=1, max_new_tokens=8, compare_reference=True)
    samples = report.sample(module.model, module.tokenizer)
    report.results = report.report(samples)
    figures = report.compare(module, samples)
    assert figures["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert figures["reward_gain"] == pytest.approx(0.0, abs=1e-9)  # same seed, same samples
    assert figures["reference_eos_rate"] == report.results["eos_rate"]
