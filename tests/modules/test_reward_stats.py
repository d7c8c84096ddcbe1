"""The reward model's exported statistics and its dropout.

``reward_stats.json`` (the mean and std PPO normalises rewards with) must be exact over the real
rows of the whole validation split, whatever the number of ranks. Under 2-process DDP with 5
validation pairs each rank reads 3 pairs, one of them a weight-0 padding repeat: the statistics
must count the 10 real completions once each, as one process does.

The reward model trains with dropout off by default (chosen and rejected are compared under the
same function); ``disable_dropout=False`` keeps the checkpoint's dropout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from prefl import CausalLMSpec, RewardModule
from prefl.data import load_tokenizer

SCRIPT = textwrap.dedent(
    """
    '''`python script.py OUT DATA DEVICES`: fit a reward model for one step (lr 0, so the
    weights stay the seeded ones) and write every rank's exported reward statistics.'''
    import json
    import sys
    from pathlib import Path

    import torch
    from lightning.pytorch import Trainer, seed_everything

    from prefl import CausalLMSpec, PreferenceDataModule, RewardModule


    def run(out, data, devices):
        torch.set_num_threads(1)
        seed_everything(0)
        module = RewardModule(
            CausalLMSpec(config="toy"),
            optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
            lr_scheduler=None,
        )
        dm = PreferenceDataModule(
            data, mode="pairs", batch_size=2, max_length=32, max_prompt_length=16,
            cache_dir=str(Path(out) / "cache"),
        )
        trainer = Trainer(
            accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
            max_steps=1, num_sanity_val_steps=0, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=out,
        )
        trainer.fit(module, datamodule=dm)
        path = Path(out) / f"stats_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(module.reward_stats))


    if __name__ == "__main__":
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)
TIMEOUT_S = 240


def _run(script, out, data, devices):
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(data), str(devices)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=out.parent,
        start_new_session=True,  # a hang kills the Lightning-launched rank 1 too
    )
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"reward-stats run on {devices} processes hung (> {TIMEOUT_S} s)")
    assert proc.returncode == 0, stderr[-4000:]
    return [json.loads((out / f"stats_rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_reward_stats_are_exact_over_the_split_on_two_ranks(tmp_path):
    from prefl.tasks import toy

    data = tmp_path / "pairs"
    data.mkdir()
    for split, rows in (
        ("train", toy.pair_rows(4, seed=11)),
        ("validation", toy.pair_rows(5, seed=12, held_out=True)),
    ):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "reward_stats_run.py"
    script.write_text(SCRIPT)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (single,) = _run(script, tmp_path / "one", data, 1)
    ranks = _run(script, tmp_path / "two", data, 2)
    assert single["count"] == 10  # 5 pairs, chosen and rejected
    assert single["std"] > 0
    for stats in ranks:  # every rank holds the whole split's statistics
        assert stats["count"] == 10
        assert stats["mean"] == pytest.approx(single["mean"], abs=1e-5)
        assert stats["std"] == pytest.approx(single["std"], abs=1e-5)


def _pairs_loader(tok, weights):
    """Two batches of one pair each, the second with ``sample_weight`` ``weights[1]``."""
    ids = torch.tensor([tok("a good movie")["input_ids"]])
    other = torch.tensor([tok("a bad movie")["input_ids"]])
    mask = torch.ones_like(ids)
    return [
        {
            "chosen_input_ids": ids,
            "chosen_attention_mask": mask,
            "rejected_input_ids": other,
            "rejected_attention_mask": mask,
            "sample_weight": torch.tensor([w]),
        }
        for w in weights
    ]


def test_reward_stats_leave_out_the_padding_repeats():
    """Batch 2 is a weight-0 repeat of batch 1 with other texts: the statistics are those of
    batch 1's two rewards alone: mean (a+b)/2, std |a-b|/2."""
    torch.manual_seed(0)
    tok = load_tokenizer("toy")
    module = RewardModule(CausalLMSpec(config="toy"), tokenizer=tok)
    module.configure_model()
    real = _pairs_loader(tok, [1.0])
    a, b = (float(r) for r in torch.cat(module(real[0])).detach())
    repeat = dict(
        real[0], chosen_input_ids=real[0]["rejected_input_ids"], sample_weight=torch.tensor([0.0])
    )
    stats = module.compute_reward_stats([real[0], repeat])
    assert stats["count"] == 2
    assert stats["mean"] == pytest.approx((a + b) / 2, abs=1e-6)
    assert stats["std"] == pytest.approx(abs(a - b) / 2, abs=1e-6)
    assert not math.isclose(a, b)


def _dropout_module(tok, **kwargs):
    config = {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_positions": 64,
        "resid_pdrop": 0.3,
        "embd_pdrop": 0.3,
        "attn_pdrop": 0.3,
    }
    torch.manual_seed(0)
    module = RewardModule(CausalLMSpec(config=config), tokenizer=tok, **kwargs)
    module.configure_model()
    module.train()
    return module


@pytest.mark.parametrize("kwargs", [{}, {"disable_dropout": False}], ids=["default", "kept"])
def test_dropout_is_off_by_default_and_kept_on_request(kwargs):
    """Two training-mode forwards of the same pair: identical with dropout off (the default);
    with ``disable_dropout=False`` the checkpoint's 0.3 dropout makes them differ."""
    tok = load_tokenizer("toy")
    module = _dropout_module(tok, **kwargs)
    batch = _pairs_loader(tok, [1.0])[0]
    torch.manual_seed(1)
    first = torch.cat(module(batch))
    second = torch.cat(module(batch))
    assert module.model.training
    if not kwargs:
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    else:
        assert (first - second).abs().max() > 1e-3
