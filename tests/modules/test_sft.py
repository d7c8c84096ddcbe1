"""SFTModule: completion-only loss, metrics, export and a short end-to-end fit on the toy task."""

import math

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefl import CausalLMSpec, HFExport, PreferenceDataModule, SFTModule
from prefl.losses import sft_loss
from prefl.models import load_tokenizer


def test_sft_loss_hand_values():
    """V=2, equal logits: every token has NLL log 2. Row 0 counts tokens 1 and 2 (mask), row 1
    only token 0, so loss = log 2 over 3 tokens. The argmax of equal logits is id 0, so the
    correct count is the number of masked labels equal to 0: labels (1, 0) and (0) -> 2."""
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[1, 1, 0], [0, 1, 1]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    loss, n_tokens, correct = sft_loss(logits, labels, mask)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert n_tokens.item() == 3
    assert correct.item() == 2


def test_sft_loss_ignores_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    expected = torch.nn.functional.cross_entropy(logits[0, 2:], labels[0, 2:])
    changed = logits.clone()
    changed[0, :2] = 100.0  # prompt positions: must not matter
    for value in (logits, changed):
        assert sft_loss(value, labels, mask)[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_sft_loss_all_masked_is_zero():
    loss, n_tokens, _ = sft_loss(
        torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3)
    )
    assert loss.item() == 0.0 and n_tokens.item() == 0


@pytest.fixture(scope="module")
def sft_data():
    dm = PreferenceDataModule(
        mode="sft", max_length=32, max_prompt_length=16, batch_size=32, max_samples=256
    )
    dm.setup("fit")
    return dm


def test_training_step_matches_manual_completion_loss(sft_data):
    torch.manual_seed(0)
    module = SFTModule(CausalLMSpec(config="toy"), tokenizer=sft_data.tokenizer)
    module.configure_model()
    batch = next(iter(sft_data.train_dataloader()))
    loss = module._step(batch, "train")
    logits = module(batch["input_ids"], batch["attention_mask"])[:, :-1]
    labels, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool()
    manual = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    assert loss.item() == pytest.approx(manual.item(), abs=1e-5)
    # the prompt tokens are not part of the loss: the mask covers completion tokens only
    assert mask.sum() < batch["attention_mask"][:, 1:].sum()


def test_tokenizer_comes_from_the_datamodule(sft_data, tmp_path):
    module = SFTModule(CausalLMSpec(config="toy"))
    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=sft_data)
    assert module.tokenizer is sft_data.tokenizer


def test_no_tokenizer_anywhere_is_a_clear_error():
    with pytest.raises(ValueError, match="no tokenizer"):
        SFTModule(CausalLMSpec(config="toy")).configure_model()


def test_fit_logs_metrics_and_exports_a_loadable_model(sft_data, tmp_path):
    torch.manual_seed(0)
    module = SFTModule(
        CausalLMSpec(config="toy"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    export = tmp_path / "export"
    trainer = Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[HFExport(str(export))],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=sft_data)
    metrics = trainer.callback_metrics
    assert math.isclose(
        metrics["val/perplexity"].item(), math.exp(metrics["val/loss"].item()), rel_tol=1e-5
    )
    assert 0.0 <= metrics["val/token_accuracy"].item() <= 1.0
    assert metrics["val/loss"].item() < math.log(len(sft_data.tokenizer))  # learned something
    assert {"train/loss_step", "train/loss_epoch", "train/token_accuracy_epoch"} <= set(metrics)
    assert (export / "model.safetensors").exists() and (export / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tok("happily , the movie was good")["input_ids"]])
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    # the export is the next stage's starting point, loaded by path
    nxt = SFTModule(str(export), tokenizer=str(export))
    nxt.configure_model()
    nxt.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(nxt.model(ids).logits, module.model(ids).logits)


def test_lr_scheduler_steps_every_optimizer_step(sft_data, tmp_path):
    module = SFTModule(
        CausalLMSpec(config="toy"),
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step),
    )
    trainer = Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=sft_data)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.125)


def test_export_before_build_is_an_error(tmp_path):
    module = SFTModule(CausalLMSpec(config="toy"), tokenizer=load_tokenizer("toy"))
    with pytest.raises(ValueError, match="not built"):
        module.export(tmp_path)


def test_max_length_beyond_the_models_positions_is_a_config_error(tmp_path):
    dm = PreferenceDataModule(mode="sft", max_length=512, max_samples=8)  # toy model: 128
    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="data.max_length=512 exceeds .*=128"):
        trainer.fit(SFTModule(CausalLMSpec(config="toy")), datamodule=dm)
