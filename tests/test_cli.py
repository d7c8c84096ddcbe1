"""The prefl CLI: every YAML under configs/ parses, links hold, --print_config round-trips, and
`prefl fit -c configs/toy/sft.yaml` meets the SFT quality bar on the toy task."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefl.cli import PreflCLI, build_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.joinpath("configs").rglob("*.yaml"))


class ParseOnly(PreflCLI):
    """Parse and validate a config without building anything (real-model configs need the hub)."""

    def instantiate_classes(self) -> None:
        pass


def test_configs_are_found_recursively():
    names = {p.relative_to(ROOT).as_posix() for p in CONFIGS}
    assert {f"configs/toy/{n}.yaml" for n in ("sft", "dpo", "reward", "ppo", "grpo")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_parses(path):
    cli = build_cli(["-c", str(path)], run=False, cli_class=ParseOnly)
    assert cli.config["model"]["class_path"].startswith("prefl.")
    assert cli.config["data"]["tokenizer"]


def test_toy_config_instantiates_with_the_tokenizer_linked():
    cli = build_cli(["-c", str(ROOT / "configs/toy/sft.yaml")], run=False)
    assert cli.model.tokenizer is cli.datamodule.tokenizer
    assert cli.datamodule.mode == "sft"
    assert type(cli.model).__name__ == "SFTModule"


def test_unknown_key_is_rejected_naming_it(capsys):
    with pytest.raises(SystemExit):
        build_cli(["-c", str(ROOT / "configs/toy/sft.yaml"), "--data.no_such_key", "1"], run=False)
    assert "no_such_key" in capsys.readouterr().err


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "-c", str(ROOT / "configs/toy/sft.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    first = tmp_path / "first.yaml"
    first.write_text(printed)
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(first), "--print_config"])
    again = capsys.readouterr().out
    assert yaml.safe_load(again) == yaml.safe_load(printed)
    assert yaml.safe_load(printed)["model"]["init_args"]["model"]["config"] == "toy"


def test_python_dash_m_prefl_help():
    out = subprocess.run(
        [sys.executable, "-m", "prefl", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--data.max_length" in out.stdout and "--model" in out.stdout


def run_prefl(config: str, cwd: Path, *extra: str, subcommand: str = "fit") -> str:
    """Run the installed ``prefl`` console script (``python -m prefl`` if it is not on PATH)."""
    command = [shutil.which("prefl")] if shutil.which("prefl") else [sys.executable, "-m", "prefl"]
    out = subprocess.run(
        [
            *command,
            subcommand,
            "-c",
            str(ROOT / config),
            "--trainer.enable_progress_bar=false",
            *extra,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    return log


def figure(log: str, pattern: str) -> float:
    return float(re.search(pattern, log).group(1))


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The toy SFT run (the main job), shared by the stages that start from its export."""
    cwd = tmp_path_factory.mktemp("toy")
    return cwd, run_prefl("configs/toy/sft.yaml", cwd)


def test_toy_sft_run_meets_the_quality_bar(toy_runs):
    """The acceptance run: well-formed samples (EOS) >= 95% and mean oracle reward within 0.05
    of the corpus's; the export and TensorBoard logs exist."""
    cwd, log = toy_runs
    assert figure(log, r"EOS rate\s+([\d.]+)") >= 0.95
    assert abs(figure(log, r"gap ([-+][\d.]+)")) <= 0.05
    export = cwd / "runs/toy/sft/export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    assert list((cwd / "runs/toy/sft").rglob("events.out.tfevents.*"))


def test_toy_dpo_run_from_the_sft_export(toy_runs):
    """DPO from the SFT export: held-out pair accuracy >= 0.85, oracle reward +0.3 over the SFT
    model's samples, samples still well formed; KL is reported."""
    cwd, _ = toy_runs
    log = run_prefl("configs/toy/dpo.yaml", cwd)
    assert figure(log, r"pair accuracy \(implicit reward\) ([\d.]+)") >= 0.85
    assert figure(log, r"gain ([-+][\d.]+)") >= 0.3
    assert figure(log, r"EOS rate\s+([\d.]+)") >= 0.95
    assert figure(log, r"KL\(policy \|\| reference\) ([\d.]+)") > 0
    assert (cwd / "runs/toy/dpo/export/model.safetensors").exists()


def test_toy_reward_run_and_predict(toy_runs):
    """Reward model from the SFT export: held-out pair accuracy >= 0.90 and Spearman >= 0.8 with
    the oracle, printed; the export carries reward statistics; `prefl predict` writes one JSON
    line per test pair."""
    cwd, _ = toy_runs
    log = run_prefl("configs/toy/reward.yaml", cwd)
    assert figure(log, r"held-out pair accuracy ([\d.]+)") >= 0.90
    assert figure(log, r"Spearman ([-\d.]+) with the oracle") >= 0.8
    export = cwd / "runs/toy/reward/export"
    stats = json.loads((export / "reward_stats.json").read_text())
    assert stats["count"] == 512 and stats["std"] > 0
    run_prefl(
        "configs/toy/reward.yaml", cwd, "--model.init_args.model", str(export), subcommand="predict"
    )
    rows = [json.loads(line) for line in (cwd / "runs/toy/reward/predictions.jsonl").open()]
    assert [r["index"] for r in rows] == list(range(256))
    accuracy = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows)
    assert accuracy >= 0.85  # the test split, scored by the exported model


@pytest.fixture(scope="module")
def toy_reward_export(toy_runs):
    """The toy reward-model export (trained here if the reward test has not run)."""
    cwd, _ = toy_runs
    export = cwd / "runs/toy/reward/export"
    if not (export / "reward_stats.json").exists():
        run_prefl("configs/toy/reward.yaml", cwd)
    return export


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ppo_oracle", "ppo", "rloo", "grpo"])
def test_toy_rl_runs_raise_the_oracle_reward(config, toy_runs, toy_reward_export):
    """PPO against the oracle and against the learned reward model, RLOO and GRPO: each raises
    the mean oracle reward of held-out samples by >= 0.4 over the SFT model's, at a sequence KL
    <= 10 nats, with >= 95% of samples well formed (ending in EOS)."""
    cwd, _ = toy_runs
    log = run_prefl(f"configs/toy/{config}.yaml", cwd)
    assert figure(log, r"gain ([-+][\d.]+)") >= 0.4
    assert figure(log, r"KL\(policy \|\| reference\) ([-\d.]+)") <= 10.0
    assert figure(log, r"EOS rate\s+([\d.]+)") >= 0.95
    assert (cwd / f"runs/toy/{config}/export/model.safetensors").exists()
