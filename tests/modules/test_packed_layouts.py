"""Every layout computes the padded path's numbers: DPO, the reward model and SFT on packed,
prompt-shared and packed + shared batches (:mod:`prefl.data.packing`).

Each run builds its module from the toy SFT export with ``seed_everything(0)`` and trains it with
plain SGD (no schedule) on the same 16 toy rows, in batches of 8, so every layout sees the same
rows in the same order; only summation order differs between layouts, hence the tolerances
(float32: log-probs within 1e-5 relative, weights after three steps within 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from prefl import DPOModule, PreferenceDataModule, RewardModule, SFTModule
from prefl.data.packing import is_packed
from prefl.models import CausalLMSpec, LoraSpec
from prefl.models.packed import PackedAttentionError, packed_model_inputs

LAYOUTS = {
    "packed": {"packing": True},
    "shared": {"share_prompt": True},
    "packed_shared": {"packing": True, "share_prompt": True},
}
SFT_LAYOUTS = {"packed": {"packing": True}}


def data(mode: str = "pairs", **layout) -> PreferenceDataModule:
    return PreferenceDataModule(
        mode=mode, max_samples=16, batch_size=8, max_length=32, max_prompt_length=16, **layout
    )


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


@pytest.fixture(scope="module")
def fit(quiet_trainer):
    """``fit(module, dm, root, steps=3, **kw)``: train ``steps`` steps, no validation."""

    def run(module, dm: PreferenceDataModule, root, steps: int = 3, **kw) -> Trainer:
        trainer = quiet_trainer(root, max_steps=steps, limit_val_batches=0, **kw)
        trainer.fit(module, datamodule=dm)
        return trainer

    return run


def weights(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad])


def first_batch(dm: PreferenceDataModule) -> dict:
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


@pytest.fixture(scope="module")
def padded_dpo(sft_dir, tmp_path_factory, fit):
    seed_everything(0)
    module = DPOModule(sft_dir, "toy", optimizer=sgd, lr_scheduler=None)
    fit(module, data(), tmp_path_factory.mktemp("dpo"))
    return module


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dpo_layouts_match_the_padded_path(layout, sft_dir, padded_dpo, tmp_path, fit):
    seed_everything(0)
    module = DPOModule(sft_dir, "toy", optimizer=sgd, lr_scheduler=None)
    module.configure_model()
    padded, packed = first_batch(data()), first_batch(data(**LAYOUTS[layout]))
    assert is_packed(packed) and not is_packed(padded)
    with torch.no_grad():
        want, got = module(padded), module(packed)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=0)
    for key in ("chosen_lengths", "rejected_lengths"):
        assert torch.equal(got[key], want[key])
    fit(module, data(**LAYOUTS[layout]), tmp_path)
    torch.testing.assert_close(weights(module), weights(padded_dpo), rtol=0, atol=1e-5)


def test_step_zero_dpo_loss_is_log_two_in_every_layout(sft_dir):
    seed_everything(0)
    module = DPOModule(sft_dir, "toy", optimizer=sgd, lr_scheduler=None)
    module.configure_model()
    for layout in [{}, *LAYOUTS.values()]:
        with torch.no_grad():
            loss = module._step(first_batch(data(**layout)), "val")
        assert float(loss) == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reward_layouts_match_the_padded_path(layout, sft_dir, tmp_path, fit):
    runs = {}
    for name, settings in {"padded": {}, layout: LAYOUTS[layout]}.items():
        seed_everything(0)
        module = RewardModule(sft_dir, "toy", optimizer=sgd, lr_scheduler=None)
        module.configure_model()
        with torch.no_grad():
            rewards = torch.cat(module(first_batch(data(**settings))))
        fit(module, data(**settings), tmp_path / name)
        runs[name] = (rewards, weights(module))
    torch.testing.assert_close(runs[layout][0], runs["padded"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[layout][1], runs["padded"][1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sft_packing_matches_the_padded_path(accumulate, sft_dir, tmp_path, fit):
    """Token-mean NLL and the weights after three steps; with ``accumulate_grad_batches=2`` the
    window's token mean spans two packed batches as it spans two padded ones."""
    runs = {}
    for name, settings in {"padded": {}, "packed": {"packing": True}}.items():
        seed_everything(0)
        module = SFTModule(sft_dir, "toy", optimizer=sgd)
        module.configure_model()
        nll, tokens = module._step(first_batch(data("sft", **settings)), "val")
        fit(module, data("sft", **settings), tmp_path / name, accumulate_grad_batches=accumulate)
        runs[name] = (float(nll / tokens), int(tokens), weights(module))
    assert runs["packed"][1] == runs["padded"][1]
    assert runs["packed"][0] == pytest.approx(runs["padded"][0], rel=1e-5)
    torch.testing.assert_close(runs["packed"][2], runs["padded"][2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_lora_dpo_and_eager_attention_take_the_shared_layout(impl, sft_dir):
    seed_everything(0)
    spec = CausalLMSpec(name_or_path=sft_dir, lora=LoraSpec(r=4, alpha=8), attn_implementation=impl)
    module = DPOModule(spec, "toy")
    module.configure_model()
    padded = first_batch(data())
    shared = first_batch(data(packing=True, share_prompt=True))
    with torch.no_grad():
        want, got = module(padded), module(shared)
        ref_want, ref_got = module.reference_logps(padded), module.reference_logps(shared)
    torch.testing.assert_close(got["chosen_logps"], want["chosen_logps"], rtol=1e-5, atol=0)
    torch.testing.assert_close(ref_got[1], ref_want[1], rtol=1e-5, atol=0)


def test_an_attention_that_cannot_take_the_layout_says_so(model):
    shared = first_batch(data(share_prompt=True))
    packed = first_batch(data(packing=True))
    impl = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(PackedAttentionError, match="prompt sharing: attn_implementation"):
            packed_model_inputs(model, shared)
        inputs = packed_model_inputs(model, packed)  # packing alone: positions tell sequences
        assert inputs["attention_mask"] is None
        assert torch.equal(inputs["position_ids"], packed["packed_position_ids"])
        model.config._attn_implementation = "my_kernel"
        with pytest.raises(PackedAttentionError, match="packing: attn_implementation 'my_kernel'"):
            packed_model_inputs(model, packed)
    finally:
        model.config._attn_implementation = impl


@pytest.mark.parametrize(
    ("mode", "layout"), [("pairs", LAYOUTS["packed_shared"]), ("sft", SFT_LAYOUTS["packed"])]
)
def test_reward_predict_reads_packed_batches(mode, layout, sft_dir):
    """``predict_step`` gives the padded batch's per-row rewards, pairs and single completions."""
    seed_everything(0)
    module = RewardModule(sft_dir, "toy")
    module.configure_model()
    with torch.no_grad():
        want = module.predict_step(first_batch(data(mode)), 0)
        got = module.predict_step(first_batch(data(mode, **layout)), 0)
    assert set(got) == set(want) and len(next(iter(got.values()))) == 8
    for key, values in want.items():
        assert got[key] == pytest.approx(values, rel=1e-5, abs=1e-6)


def test_precomputed_reference_logps_are_the_padded_ones(sft_dir, tmp_path, fit):
    """``precompute_ref_logps`` scores the splits through the data module's collator, packed
    here: the stored columns equal the padded run's, row by row."""
    columns = {}
    for name, layout in {"padded": {}, "packed_shared": LAYOUTS["packed_shared"]}.items():
        seed_everything(0)
        module = DPOModule(sft_dir, "toy", precompute_ref_logps=True, optimizer=sgd)
        dm = data(**layout)
        fit(module, dm, tmp_path / name, steps=1)
        train = dm.datasets["train"]
        columns[name] = (train["ref_chosen_logps"], train["ref_rejected_logps"])
    for got, want in zip(columns["packed_shared"], columns["padded"], strict=True):
        assert len(got) == 16 and got == pytest.approx(want, rel=1e-5)


def test_gradient_checkpointing_takes_the_shared_layout(sft_dir):
    """Activation checkpointing re-runs each layer in the backward: the re-run sees the same
    layout, so the packed + shared gradients are the padded ones."""
    grads = {}
    for name, layout in {"padded": {}, "packed_shared": LAYOUTS["packed_shared"]}.items():
        seed_everything(0)
        spec = CausalLMSpec(name_or_path=sft_dir, gradient_checkpointing=True)
        module = DPOModule(spec, "toy", optimizer=sgd, lr_scheduler=None)
        module.configure_model()
        module.train()
        assert module.model.model.gradient_checkpointing
        module._step(first_batch(data(**layout)), "val").backward()
        grads[name] = torch.cat([p.grad.flatten() for p in module.model.parameters()])
    assert grads["padded"].abs().max() > 0
    torch.testing.assert_close(grads["packed_shared"], grads["padded"], rtol=1e-4, atol=1e-6)
