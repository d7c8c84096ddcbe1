"""RewardModule: logged metrics, reward statistics and export, margin, centering, predict.

Every test fits the toy model (2 layers, 64 wide) for one or two steps on a few toy pairs. Metric
checks recompute by hand, from ``module(batch)`` on the same data with the trained weights:
``loss = mean(-logσ(c - r - m) + λ·(c + r)²)``, ``accuracy = share of c > r`` (strict),
``margin = mean(c - r)``, ``reward_mean``/``reward_std`` the mean and *population* std of the
rewards of all chosen and rejected completions together.
"""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from prefl import CausalLMSpec, HFExport, PreferenceDataModule, RewardModule, RewardWriter
from prefl.data import load_tokenizer
from prefl.losses import bradley_terry_loss
from prefl.models import LoraSpec
from prefl.models.reward import STATS_FILE, RewardModel, reward_head
from prefl.tasks import toy

METRICS = ("loss", "accuracy", "margin", "reward_mean", "reward_std")
#: Rewards are float32 and the module's std is ``sqrt(E[r²] - E[r]²)`` from float32 running means,
#: which loses a few digits when |mean| >> std; the hand values below are float64.
TOL = 1e-5
STD_TOL = 1e-4


def data(n=16, batch_size=8, **kw):
    kw = {"max_length": 32, "max_prompt_length": 16, **kw}
    return PreferenceDataModule(
        mode=kw.pop("mode", "pairs"), max_samples=n, batch_size=batch_size, **kw
    )


def trainer(tmp_path, **kw):
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    return Trainer(**{**defaults, **kw})


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


@torch.no_grad()
def rewards_on(module: RewardModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards ``(N,)`` (float64) of every pair of ``loader``, in order."""
    chosen, rejected = [], []
    for batch in loader:
        c, r = module(batch)
        chosen.append(c.double())
        rejected.append(r.double())
    return torch.cat(chosen), torch.cat(rejected)


def in_order(dm: PreferenceDataModule, split: str = "train") -> DataLoader:
    """All rows of a split in row order, in one batch."""
    ds = dm.datasets[split]
    return DataLoader(ds, batch_size=len(ds), collate_fn=dm.collator)


# --------------------------------------------------------------------------- fit, metrics, export


@pytest.fixture(scope="module")
def fitted(sft_dir, tmp_path_factory):
    """One epoch (16 pairs, batch 8: two SGD steps), validated at its end on 16 held-out pairs,
    exported by ``HFExport`` after ``fit``."""
    tmp = tmp_path_factory.mktemp("fit")
    seed_everything(0)
    module = RewardModule(sft_dir, optimizer=sgd(0.5))
    dm = data()
    t = trainer(tmp, max_epochs=1, callbacks=[HFExport(str(tmp / "export"))])
    t.fit(module, datamodule=dm)
    metrics = {k: v.item() for k, v in t.callback_metrics.items()}
    return module, dm, metrics, tmp / "export"


def test_fit_logs_every_metric_for_train_and_val(fitted):
    _, _, metrics, _ = fitted
    for stage in ("train", "val"):
        for name in METRICS:
            assert f"{stage}/{name}" in metrics, f"{stage}/{name}"
            assert math.isfinite(metrics[f"{stage}/{name}"])
    assert "train/loss_step" in metrics
    assert 0.0 <= metrics["train/accuracy"] <= 1.0
    assert metrics["val/reward_std"] > 0.0


def test_val_metrics_equal_a_hand_computation(fitted):
    """Validation ran after the last step, so the final weights reproduce it: over the 16
    validation pairs, ``val/loss = mean(-logσ(c - r))``, ``val/accuracy = mean(c > r)``,
    ``val/margin = mean(c - r)``, ``val/reward_mean = mean(c ∪ r)`` and ``val/reward_std`` the
    population std (divide by 32, not 31) of the 32 rewards."""
    module, dm, metrics, _ = fitted
    c, r = rewards_on(module, dm.val_dataloader())
    assert c.shape == (16,)
    both = torch.cat([c, r])
    d = (c - r).tolist()
    loss = sum(math.log1p(math.exp(-x)) for x in d) / len(d)
    accuracy = sum(x > 0 for x in d) / len(d)
    mean = both.mean().item()
    std = math.sqrt(sum((x - mean) ** 2 for x in both.tolist()) / len(both))
    assert std == pytest.approx(both.std(correction=0).item(), abs=1e-12)
    assert std != pytest.approx(both.std(correction=1).item(), abs=STD_TOL)  # the two differ
    assert metrics["val/loss"] == pytest.approx(loss, abs=TOL)
    assert metrics["val/accuracy"] == pytest.approx(accuracy, abs=1e-7)
    assert metrics["val/margin"] == pytest.approx(sum(d) / len(d), abs=TOL)
    assert metrics["val/reward_mean"] == pytest.approx(mean, abs=TOL)
    assert metrics["val/reward_std"] == pytest.approx(std, abs=STD_TOL)


def test_reward_stats_after_fit(fitted):
    """``on_train_end`` computes mean and std (population) of the 2 × 16 validation rewards."""
    module, dm, _, _ = fitted
    c, r = rewards_on(module, dm.val_dataloader())
    both = torch.cat([c, r])
    stats = module.reward_stats
    assert stats is not None
    assert set(stats) == {"mean", "std", "count"}
    assert stats["count"] == 2 * len(dm.datasets["validation"]) == 32
    assert stats["mean"] == pytest.approx(both.mean().item(), abs=1e-6)
    assert stats["std"] == pytest.approx(both.std(correction=0).item(), abs=1e-6)


def test_export_writes_stats_and_round_trips(fitted):
    """``HFExport`` wrote ``reward_stats.json`` (= ``module.reward_stats``); the directory loads
    with ``AutoModelForSequenceClassification`` (right-padded batches, so its default positions
    are right) and with ``RewardModel.from_pretrained``, both scoring like the trained module."""
    module, dm, _, out = fitted
    assert json.loads((out / STATS_FILE).read_text()) == module.reward_stats
    c, r = rewards_on(module, dm.val_dataloader())
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    loaded = RewardModel.from_pretrained(out)
    assert loaded.stats == module.reward_stats
    hf_c, hf_r, rm_c, rm_r = [], [], [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            for name, hf_out, rm_out in (("chosen", hf_c, rm_c), ("rejected", hf_r, rm_r)):
                ids, mask = batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"]
                hf_out.append(hf(input_ids=ids, attention_mask=mask).logits[:, 0].double())
                rm_out.append(loaded(ids, mask).double())
    for got, expected in ((hf_c, c), (hf_r, r), (rm_c, c), (rm_r, r)):
        torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=TOL)


def test_module_export_writes_the_same_directory(fitted, tmp_path):
    """``module.export(dir)`` is what ``HFExport`` calls: stats file and scores are the same."""
    module, _, _, out = fitted
    module.export(tmp_path)
    assert json.loads((tmp_path / STATS_FILE).read_text()) == module.reward_stats
    prompts, completions = ["happily , the movie was"], ["great fun"]
    expected = RewardModel.from_pretrained(out).score(prompts, completions)
    assert RewardModel.from_pretrained(tmp_path).score(prompts, completions) == pytest.approx(
        expected, abs=TOL
    )
    assert module.model.score(prompts, completions) == pytest.approx(expected, abs=TOL)


def test_lora_fit_trains_head_and_adapters_and_exports_merged(sft_dir, tmp_path):
    """With LoRA the optimizer holds exactly the adapters and the head's trained copy; both move
    in two SGD steps, and the merged export scores like the LoRA module."""
    seed_everything(0)
    module = RewardModule(
        CausalLMSpec(name_or_path=sft_dir, lora=LoraSpec(r=4)), optimizer=sgd(0.5)
    )
    module.tokenizer = load_tokenizer(sft_dir)
    module.configure_model()
    head = reward_head(module.model.model)
    head_before = head.weight.detach().clone()
    dm = data()
    t = trainer(tmp_path, max_epochs=1)
    t.fit(module, datamodule=dm)
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    names = {id(p): n for n, p in module.named_parameters()}
    assert id(head.weight) in in_optimizer
    assert all("lora_" in names[i] or "modules_to_save" in names[i] for i in in_optimizer)
    assert not torch.equal(head.weight, head_before)
    out = module.export(tmp_path / "export")
    c, r = rewards_on(module, dm.val_dataloader())
    loaded = RewardModel.from_pretrained(out)
    assert loaded.stats == module.reward_stats
    with torch.no_grad():
        batch = next(iter(dm.val_dataloader()))
        got = loaded(batch["chosen_input_ids"], batch["chosen_attention_mask"]).double()
    torch.testing.assert_close(got, c[:8], rtol=0, atol=TOL)


# --------------------------------------------------------------------------- the loss in training


def one_step_loss(
    sft_dir, tmp_path, dataset, **module_kw
) -> tuple[float, RewardModule, PreferenceDataModule]:
    """``train/loss`` of one step with learning rate 0 over the whole dataset in one batch (the
    weights do not move, so ``module(batch)`` afterwards gives the rewards the loss saw)."""
    seed_everything(0)  # the same new head in every call
    module = RewardModule(sft_dir, optimizer=sgd(0.0), lr_scheduler=None, **module_kw)
    dm = PreferenceDataModule(dataset, mode="pairs", batch_size=len(dataset), max_length=32)
    t = trainer(tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match="no validation split"):
        t.fit(module, datamodule=dm)
    return t.callback_metrics["train/loss"].item(), module, dm


MARGINS = [0.0, 0.5, 1.0, -0.5, 2.0, 0.25, 3.0, -1.0]


def pair_dataset(margins=None) -> datasets.Dataset:
    rows = toy.pair_rows(len(MARGINS), seed=3)
    if margins is not None:
        rows = [{**row, "margin": m} for row, m in zip(rows, margins, strict=True)]
    return datasets.Dataset.from_list(rows)


def test_margin_column_flows_into_the_loss(sft_dir, tmp_path):
    """With a ``margin`` column the loss is ``mean(log(1 + e^{-(c - r - m)}))``; without, the
    same rewards give ``mean(log(1 + e^{-(c - r)}))``, a different number."""
    with_margin, module, dm = one_step_loss(sft_dir, tmp_path, pair_dataset(MARGINS))
    without, module0, dm0 = one_step_loss(sft_dir, tmp_path, pair_dataset())
    assert "margin" in dm.datasets["train"].column_names
    assert "margin" not in dm0.datasets["train"].column_names
    batch = next(iter(in_order(dm)))
    assert batch["margin"].tolist() == MARGINS
    c, r = rewards_on(module, in_order(dm))
    c0, r0 = rewards_on(module0, in_order(dm0))
    torch.testing.assert_close(c, c0, rtol=0, atol=1e-6)  # same model, same pairs
    torch.testing.assert_close(r, r0, rtol=0, atol=1e-6)
    d = (c - r).tolist()
    hand = sum(math.log1p(math.exp(-(x - m))) for x, m in zip(d, MARGINS, strict=True)) / 8
    hand0 = sum(math.log1p(math.exp(-x)) for x in d) / 8
    assert with_margin == pytest.approx(hand, abs=TOL)
    assert without == pytest.approx(hand0, abs=TOL)
    assert abs(with_margin - without) > 0.05


def test_center_rewards_coefficient_adds_the_centering_term(sft_dir, tmp_path):
    """λ = 0.5 adds ``λ·mean((c + r)²)`` to the λ = 0 loss of the same rewards."""
    lam = 0.5
    plain, module, dm = one_step_loss(sft_dir, tmp_path, pair_dataset())
    centred, _, _ = one_step_loss(sft_dir, tmp_path, pair_dataset(), center_rewards_coefficient=lam)
    c, r = rewards_on(module, in_order(dm))
    extra = lam * ((c + r) ** 2).mean().item()
    assert extra > 0.01
    assert centred - plain == pytest.approx(extra, abs=TOL)
    d = (c - r).tolist()
    hand = sum(math.log1p(math.exp(-x)) for x in d) / len(d) + extra
    assert centred == pytest.approx(hand, abs=TOL)


# --------------------------------------------------------------------------- data, predict


def test_over_long_pairs_are_truncated_not_dropped():
    """Toy prompts are BOS + 5 words (6 tokens) and completions 3–10 words + EOS; with
    ``max_length=10`` a completion keeps at most 4 tokens, so long ones are cut, none dropped."""
    dm = data(n=32, max_length=10, max_prompt_length=8)
    dm.setup("fit")
    stats = dm.stats["train"]
    assert stats["truncated"] > 0
    assert stats["used"] == stats["read"] == 32
    assert stats["dropped"] == {}
    for batch in dm.train_dataloader():
        assert batch["chosen_input_ids"].shape[1] <= 10


def test_predict_pairs_writes_one_line_per_row_in_order(sft_dir, tmp_path):
    """``predict`` on the pairs test split: ``chosen_reward``/``rejected_reward`` per row, equal to
    ``module(batch)``; ``RewardWriter`` writes lines ``index`` 0..n-1 in order (batches of 4)."""
    seed_everything(0)
    module = RewardModule(sft_dir)
    dm = data(n=10, batch_size=4)
    path = tmp_path / "pairs.jsonl"
    t = trainer(tmp_path, callbacks=[RewardWriter(str(path))])
    predictions = t.predict(module, datamodule=dm, return_predictions=True)
    assert len(predictions) == 3  # 4 + 4 + 2
    assert set(predictions[0]) == {"chosen_reward", "rejected_reward"}
    c, r = rewards_on(module, dm.predict_dataloader())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(10))
    assert all(set(line) == {"index", "chosen_reward", "rejected_reward"} for line in lines)
    assert [x["chosen_reward"] for x in lines] == pytest.approx(c.tolist(), abs=1e-6)
    assert [x["rejected_reward"] for x in lines] == pytest.approx(r.tolist(), abs=1e-6)
    flat = [x for p in predictions for x in p["chosen_reward"]]
    assert flat == pytest.approx(c.tolist(), abs=1e-6)


def test_predict_sft_gives_one_reward_per_row(sft_dir, tmp_path):
    """On ``sft`` batches (prompt + completion) ``predict`` returns ``reward``, equal to the reward
    model on the batch's ids."""
    seed_everything(0)
    module = RewardModule(sft_dir)
    dm = data(n=7, batch_size=3, mode="sft")
    path = tmp_path / "sft.jsonl"
    t = trainer(tmp_path, callbacks=[RewardWriter(str(path))])
    predictions = t.predict(module, datamodule=dm, return_predictions=True)
    assert set(predictions[0]) == {"reward"}
    expected = []
    with torch.no_grad():
        for batch in dm.predict_dataloader():
            expected += module.model(batch["input_ids"], batch["attention_mask"]).tolist()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(7))
    assert all(set(line) == {"index", "reward"} for line in lines)
    assert [x["reward"] for x in lines] == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- no validation


def test_no_validation_split_warns_and_keeps_no_stats(sft_dir, tmp_path):
    """Without a validation split there are no reward statistics: a warning, ``reward_stats``
    None, and the export has no ``reward_stats.json`` (PPO then does not normalise)."""
    module = RewardModule(sft_dir, optimizer=sgd())
    t = trainer(tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match="no validation split"):
        t.fit(module, datamodule=data(val_split="none"))
    assert module.reward_stats is None
    out = module.export(tmp_path / "export")
    assert not (out / STATS_FILE).exists()
    assert RewardModel.from_pretrained(out).stats is None


def test_head_lr_trains_the_head_at_its_own_rate(sft_dir):
    """``head_lr`` puts the scalar head in a parameter group of its own: with the backbone's rate
    0, one SGD step moves the head by ``head_lr`` times its gradient and leaves the backbone as
    it was; without ``head_lr`` the head stays where it started too."""
    dm = data(n=8)
    dm.setup("fit")
    batch = next(iter(in_order(dm)))
    for head_lr in (None, 0.5):
        seed_everything(0)
        module = RewardModule(
            sft_dir, dm.tokenizer, optimizer=sgd(0.0), lr_scheduler=None, head_lr=head_lr
        )
        module.configure_model()
        optimizer = module.configure_optimizers()
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == ([0.0] if head_lr is None else [0.0, 0.5])
        head = reward_head(module.model.model).weight
        embeddings = module.model.model.get_input_embeddings().weight
        head_before, embeddings_before = head.detach().clone(), embeddings.detach().clone()
        chosen, rejected = module(batch)
        bradley_terry_loss(chosen, rejected).mean().backward()
        step = 0.5 * head.grad if head_lr else torch.zeros_like(head)
        assert step.abs().max() > 1e-4 or not head_lr
        optimizer.step()
        torch.testing.assert_close(head.detach(), head_before - step, rtol=0, atol=1e-7)
        assert torch.equal(embeddings.detach(), embeddings_before)
    with pytest.raises(ValueError, match="head_lr must be > 0 or None, got 0"):
        RewardModule(sft_dir, head_lr=0)
