"""SFTModule: completion-only loss, metrics, export and a short end-to-end fit on the toy task."""

import json
import math

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefl import CausalLMSpec, HFExport, PreferenceDataModule, SFTModule
from prefl.data import load_tokenizer
from prefl.losses import sft_loss
from prefl.training.accumulation import TokenMeanWindow


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
    nll_sum, n_tokens = module._step(batch, "train")
    loss = TokenMeanWindow().loss(nll_sum, n_tokens)  # a window's first micro-batch: its mean
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


def test_token_mean_window_hand_values():
    """Micro-batches of 4 and 12 tokens with NLL sums 8 and 6: the losses returned are 8/4 = 2
    and 6/4 = 1.5 (both over the first micro-batch's count); with k = 2 Lightning sums half of
    each, so the gradient is that of (2 + 1.5)/2 = 1.75 and the factor k·4/16 = 0.5 turns it
    into that of the window's token mean (8 + 6)/16 = 0.875."""
    window = TokenMeanWindow()
    first = window.loss(torch.tensor(8.0), torch.tensor(4))
    second = window.loss(torch.tensor(6.0), torch.tensor(12))
    assert (first.item(), second.item()) == (2.0, 1.5)
    assert window.factor(2) == 0.5
    assert (first.item() + second.item()) / 2 * window.factor(2) == 0.875
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([1.0, -4.0])
    assert window.rescale(torch.optim.SGD([param], lr=1.0), 2) == 0.5
    assert param.grad.tolist() == [0.5, -2.0]
    assert window.factor(2) == 1.0  # a new, empty window
    one = TokenMeanWindow()  # one micro-batch per step: the plain token mean, factor exactly 1
    assert one.loss(torch.tensor(6.0), torch.tensor(12)).item() == 0.5 and one.factor(1) == 1.0


def _uneven_sft_rows(tmp_path):
    """Three prompt + completion rows with 1, 9 and 3 completion words."""
    completions = [
        "good",
        "really really flat wonderful with good bit wonderful moving",
        "weak with fresh",
    ]
    rows = [{"prompt": "happily , the movie was", "completion": c} for c in completions]
    path = tmp_path / "sft_rows" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path.parent)


def _one_epoch_of_sgd(data_dir, batch_size, accumulate, tmp_path):
    torch.manual_seed(0)
    module = SFTModule(
        CausalLMSpec(config="toy"),
        tokenizer="toy",
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
    )
    data = PreferenceDataModule(
        data_dir,
        mode="sft",
        batch_size=batch_size,
        max_length=32,
        max_prompt_length=16,
        cache_dir=str(tmp_path / f"cache{batch_size}"),
    )
    trainer = Trainer(
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module.configure_model()
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters()])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    after = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    return after - before


def test_gradient_accumulation_steps_as_one_batch_would(tmp_path):
    """Rows of 2, 10 and 4 target tokens (completion words + EOS), SGD: batches of one row
    accumulated over k = 2 (windows {r0, r1} and the short last {r2}) must move the weights
    exactly as batches of two rows without accumulation ({r0, r1}, {r2}). A mean of
    micro-batch means would weigh r0's 2 tokens as much as r1's 10."""
    data_dir = _uneven_sft_rows(tmp_path)
    accumulated = _one_epoch_of_sgd(data_dir, 1, 2, tmp_path)
    whole = _one_epoch_of_sgd(data_dir, 2, 1, tmp_path)
    assert whole.abs().max() > 1e-3
    scale = whole.abs().max().item()
    torch.testing.assert_close(accumulated, whole, rtol=0, atol=1e-5 * scale)
