"""RL on the real SmolLM2-135M-Instruct: RLOO with the rule-based reward through the CLI and
``configs/smollm2/rloo.yaml``, and PPO against the reward model of the reward tests.

Each runs two rollouts on real HH prompts in the chat template (the first from the reference
itself, so its KL is exactly 0; the second after one update) and must log a finite KL and an
EOS rate; each export loads with plain ``AutoModelForCausalLM`` and generates.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from smollm2_support import (
    MetricHistory,
    RewardRun,
    adamw,
    assert_vocabulary_kept,
    cpu_trainer,
    greedy_replies,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefl import HFExport, PPOModule, PreferenceDataModule
from prefl.cli import build_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEYS = ("ppo/kl", "ppo/eos_rate", "ppo/score", "ppo/response_length", "ppo/entropy")


def check_rollouts(history: dict[str, list[float]], label: str) -> None:
    """Two rollouts logged: KL exactly 0 on the first (the policy is the reference), finite and
    small on the second (one small step), an EOS rate in [0, 1], a finite score and entropy."""
    print(label, {key: [round(v, 4) for v in values] for key, values in history.items()})
    kl, eos = history["ppo/kl"], history["ppo/eos_rate"]
    assert len(kl) == 2 and abs(kl[0]) < 1e-6
    assert math.isfinite(kl[1]) and abs(kl[1]) < 5.0
    assert all(0.0 <= rate <= 1.0 for rate in eos)
    assert all(math.isfinite(v) for key in ("ppo/score", "ppo/entropy") for v in history[key])


def check_export(export: Path) -> None:
    """The export loads with plain transformers, keeps the vocabulary, and replies greedily."""
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert_vocabulary_kept(model)
    replies = greedy_replies(model, AutoTokenizer.from_pretrained(export))
    assert all(reply.strip() for reply in replies)


def test_rloo_with_the_rule_reward_runs_from_its_config(
    smollm2_dir, hh_path, tmp_path, monkeypatch
):
    """``prefl fit -c configs/smollm2/rloo.yaml`` with the overrides of docs/real-model.md (the
    model directory for the hub id, the shared HH file for the hub dataset) and a small overlay:
    2 rollouts of 2 prompts x 4 samples, 48 new tokens, one update epoch. The reward function is
    named by module path in the config, so the repository root goes on ``sys.path`` as
    ``python -m prefl`` from the root would put it.

    Measured (2-core CPU, seed 0), rollouts 1 and 2: KL 0.000, 0.312 nats; EOS rate 0.375,
    0.625; score -0.250, +0.246 (replies that do not end within 48 tokens score -1); length
    38.6, 43.1 tokens; entropy 1.32, 1.40. Bounds in :func:`check_rollouts`: the first KL is 0
    up to rounding (the policy is the reference), the second finite and under 5 nats (one step
    at lr 2e-6 cannot move a 135M model further; a wrong temperature or mask would)."""
    monkeypatch.syspath_prepend(str(ROOT))
    export = tmp_path / "rloo"
    history = MetricHistory(KEYS)
    overlay = tmp_path / "overlay.yaml"
    trainer = {
        "max_steps": -1,
        "max_epochs": 1,
        "limit_train_batches": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "default_root_dir": str(tmp_path),
        "callbacks": [{"class_path": "prefl.HFExport", "init_args": {"dirpath": str(export)}}],
    }
    overlay.write_text(yaml.safe_dump({"trainer": trainer}))
    cli = build_cli(
        [
            *("-c", str(ROOT / "configs/smollm2/rloo.yaml"), "-c", str(overlay)),
            *("--model.init_args.model.name_or_path", str(smollm2_dir)),
            *("--data.tokenizer", str(smollm2_dir), "--data.dataset", str(hh_path)),
            *("--data.max_samples", "16", "--data.batch_size", "2"),
            *("--model.init_args.max_new_tokens", "48", "--model.init_args.ppo_epochs", "1"),
            *("--model.init_args.mini_batch_size", "8", "--model.init_args.micro_batch_size", "8"),
        ],
        run=False,
    )
    cli.trainer.callbacks.append(history)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.reward_fns == ["configs.smollm2.rewards:reply_format_reward"]
    check_rollouts(history.history, "RLOO")
    check_export(export)


def test_ppo_against_the_reward_model(smollm2_dir, hh_pairs, reward_run: RewardRun, tmp_path):
    """PPO (GAE, the critic initialised from the reward model, rewards normalised with its
    exported statistics): 2 rollouts of 4 prompts, 48 new tokens, one update epoch.

    Measured (2-core CPU, seed 0), rollouts 1 and 2: KL 0.000, 0.367 nats; EOS rate 0.25, 0.25;
    normalised reward-model score +3.04, +2.02, shaped score -2.45, -2.23 (replies that do not
    end get -3); value loss 2.60, 2.72. Bounds as for RLOO, and a finite value loss."""
    data = PreferenceDataModule(
        hh_pairs,
        str(smollm2_dir),
        mode="prompts",
        row_format="hh_chat",
        max_length=192,
        max_prompt_length=128,
        batch_size=4,
        pad_to_multiple_of=32,
        val_split="none",
    )
    ppo = PPOModule(
        str(smollm2_dir),
        reward_model=str(reward_run.export),
        advantage_estimator="gae",
        temperature=0.7,
        max_new_tokens=48,
        ppo_epochs=1,
        no_eos_score=-3.0,
        optimizer=adamw(1e-6),
        value_optimizer=adamw(5e-6),
    )
    history = MetricHistory((*KEYS, "ppo/value_loss", "ppo/score_reward_model"))
    export = tmp_path / "ppo"
    callbacks = [history, HFExport(str(export))]
    trainer = cpu_trainer(limit_train_batches=2, max_epochs=1, callbacks=callbacks)
    trainer.fit(ppo, datamodule=data)
    assert ppo.scorer.reward_model.stats["std"] > 0  # the export's statistics normalise it
    check_rollouts(history.history, "PPO")
    assert all(math.isfinite(v) for v in history.history["ppo/value_loss"])
    check_export(export)
