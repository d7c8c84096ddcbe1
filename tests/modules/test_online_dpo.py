"""OnlineDPOModule on the toy task: pairing by hand, the pairs it samples (best against worst by
the oracle, ties weighing 0), the step-0 loss, options that change the pairs, the reference
moved to the policy (iterative DPO's rounds), and LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from prefl import OnlineDPOModule, PreferenceDataModule
from prefl.models import CausalLMSpec, LoraSpec
from prefl.modules.online_dpo import best_and_worst
from prefl.tasks import toy


def test_best_and_worst_by_hand():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, -1.0, 2.0, 2.0])
    best, worst, tie = best_and_worst(scores, 3)
    assert best.tolist() == [1, 3, 7] and worst.tolist() == [0, 3, 6]
    assert tie.tolist() == [False, True, False]


def prompts_batch(n: int = 8) -> dict:
    dm = PreferenceDataModule(mode="prompts", max_samples=n, batch_size=n, max_length=32)
    dm.setup("fit")
    torch.manual_seed(0)
    return next(iter(dm.train_dataloader()))


def built(sft_dir, **kw) -> OnlineDPOModule:
    seed_everything(0)
    settings = {"reward_fns": ["toy"], "max_new_tokens": 8, "num_samples": 4}
    module = OnlineDPOModule(sft_dir, "toy", lr_scheduler=None, **{**settings, **kw})
    module.configure_model()
    return module


def test_sampled_pairs_are_best_against_worst(sft_dir):
    """By the oracle's score of the decoded completions (no EOS penalty here, which would score
    a completion without EOS -1 whatever its words)."""
    module = built(sft_dir, no_eos_score=None)
    batch = prompts_batch()
    pairs, stats = module.sample_pairs(batch, seed=3)
    tok = module.resolve_tokenizer()
    assert (
        pairs["chosen_input_ids"].shape[0] == 8
        and 0.0 <= float(stats["online/ties"][0].mean()) <= 1.0
    )
    for b in range(8):
        chosen = pairs["chosen_input_ids"][b][pairs["chosen_loss_mask"][b].bool()]
        rejected = pairs["rejected_input_ids"][b][pairs["rejected_loss_mask"][b].bool()]
        prompt = batch["prompt"][b]
        scores = toy.oracle_rewards(
            [prompt, prompt],
            tok.batch_decode([chosen, rejected], skip_special_tokens=True),
        )
        if pairs["sample_weight"][b] > 0:
            assert scores[0] > scores[1]
    assert set(pairs["sample_weight"].tolist()) <= {0.0, 1.0} and pairs["sample_weight"].sum() > 0
    scores, kl = stats["online/score"][0], stats["online/kl"][0]
    assert scores.shape == kl.shape == (32,) and bool(torch.isfinite(scores).all())
    assert float(kl.abs().max()) < 1e-5  # policy = reference


def test_step_zero_loss_is_log_two_on_the_real_pairs(sft_dir):
    module = built(sft_dir)
    pairs, _ = module.sample_pairs(prompts_batch(), seed=3)
    with torch.no_grad():
        policy = module(pairs)
        reference = module.reference_logps(pairs)
    torch.testing.assert_close(policy["chosen_logps"], reference[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [{"num_samples": 2}, {"temperature": 0.5}, {"max_new_tokens": 4}])
def test_every_sampling_option_changes_the_pairs(kw, sft_dir):
    a, _ = built(sft_dir).sample_pairs(prompts_batch(), seed=3)
    b, _ = built(sft_dir, **kw).sample_pairs(prompts_batch(), seed=3)
    assert a["chosen_input_ids"].shape != b["chosen_input_ids"].shape or not torch.equal(
        a["chosen_input_ids"], b["chosen_input_ids"]
    )


@pytest.fixture(scope="module")
def fit(quiet_trainer):
    """``fit(module, root, steps=3)``: ``steps`` steps on 32 toy prompts, batches of 8, one
    validation batch at the end."""

    def run(module, root, steps: int = 3) -> Trainer:
        dm = PreferenceDataModule(mode="prompts", max_samples=32, batch_size=8, max_length=32)
        kw = {"max_steps": steps, "limit_val_batches": 1, "val_check_interval": steps}
        trainer = quiet_trainer(root, **kw)
        trainer.fit(module, datamodule=dm)
        return trainer

    return run


def test_training_logs_online_and_dpo_metrics(sft_dir, tmp_path, fit):
    module = built(sft_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = fit(module, tmp_path)
    metrics = trainer.callback_metrics
    for key in ("train/online/score", "train/online/kl", "train/online/eos_rate", "val/loss"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert float(metrics["train/online/kl_epoch"]) > 0  # the policy moved off the reference


def test_a_full_reference_sync_makes_the_reference_the_policy(sft_dir, tmp_path, fit):
    module = built(sft_dir, ref_sync_every=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    fit(module, tmp_path, steps=2)
    for ref, pol in zip(module.reference.parameters(), module.model.parameters(), strict=True):
        torch.testing.assert_close(ref, pol.detach(), rtol=0, atol=0)


def test_a_round_samples_from_the_policy_at_its_start(sft_dir, tmp_path, fit):
    """``round_size=4``: after 2 steps the sampler is still the initial policy (its pairs are
    the untrained module's), while the policy itself has moved."""
    module = built(sft_dir, round_size=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    fit(module, tmp_path, steps=2)
    initial = built(sft_dir)
    batch = prompts_batch()
    got, _ = module.sample_pairs(batch, seed=9)
    want, _ = initial.sample_pairs(batch, seed=9)
    assert torch.equal(got["chosen_input_ids"], want["chosen_input_ids"])
    moved = [
        (a - b).abs().max()
        for a, b in zip(module.model.parameters(), initial.model.parameters(), strict=True)
    ]
    assert max(moved) > 1e-4
    with pytest.raises(ValueError, match="model.round_size must be >= 1"):
        OnlineDPOModule(sft_dir, reward_fns=["toy"], round_size=0)


def test_lora_online_dpo(sft_dir, tmp_path, fit):
    spec = CausalLMSpec(name_or_path=sft_dir, lora=LoraSpec(r=4, alpha=8))
    module = built(spec, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    fit(module, tmp_path, steps=2)
    assert module.reference is None
    pairs, stats = module.sample_pairs(prompts_batch(), seed=5)
    assert float(stats["online/kl"][0].abs().max()) > 0.0


def test_settings_are_checked(sft_dir):
    with pytest.raises(ValueError, match="model.num_samples must be >= 2"):
        OnlineDPOModule(sft_dir, reward_fns=["toy"], num_samples=1)
