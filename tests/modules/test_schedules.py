"""WarmupCosineLR: hand-derived factors, and the run length filled in by the module."""

import math

import pytest
import torch
from lightning.pytorch import Trainer

from prefl import CausalLMSpec, DPOModule, PreferenceDataModule
from prefl.training.schedules import WarmupCosineLR


def make(total=10, warmup_ratio=0.2, min_lr_ratio=0.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return opt, WarmupCosineLR(opt, total, warmup_ratio, min_lr_ratio)


def test_factors_by_hand():
    """total 10, warmup int(0.2*10)=2: steps 0,1 -> 1/3, 2/3; step 2 starts the cosine at 1;
    step 6 is progress (6-2)/8 = 1/2 -> 0.5*(1+cos(pi/2)) = 0.5; step 10 -> 0."""
    _, sched = make()
    assert [sched.factor(s) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert sched.factor(6) == pytest.approx(0.5)
    assert sched.factor(10) == pytest.approx(0.0, abs=1e-12)
    _, floor = make(min_lr_ratio=0.1)
    assert floor.factor(10) == pytest.approx(0.1) and floor.factor(6) == pytest.approx(0.55)


def test_lr_follows_the_factor_and_state_round_trips():
    opt, sched = make()
    for _ in range(6):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    opt2, sched2 = make(total=99)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.total_steps == 10 and sched2.last_epoch == 6
    assert math.isclose(sched2.factor(sched2.last_epoch), 0.5)


def test_bad_warmup_ratio():
    with pytest.raises(ValueError, match="warmup_ratio"):
        make(warmup_ratio=1.0)


def test_module_fills_in_the_run_length(tmp_path):
    module = DPOModule(CausalLMSpec(config="toy"), lr_scheduler=WarmupCosineLR)
    dm = PreferenceDataModule(mode="pairs", max_samples=24, batch_size=8, max_length=32)
    trainer = Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.total_steps == 6  # 3 batches x 2 epochs
    assert sched.last_epoch == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
