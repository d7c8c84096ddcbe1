"""The README's main job, `python -m prefl.toy` (SFT, reward model, DPO and PPO on the toy task,
then evaluation), run once per module: the quality bars of each stage, summary.json and the
frontier, TensorBoard tags, and the `prefl` CLI runs (predict, RL configs) that start from its
exports."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
def pipeline(tmp_path_factory):
    """The README's main job, `python -m prefl.toy`: SFT, reward model, DPO and PPO on the toy
    task, then evaluation. Later tests reuse its exports."""
    out = tmp_path_factory.mktemp("pipeline")
    proc = subprocess.run(
        [sys.executable, "-m", "prefl.toy", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return out, log, json.loads((out / "summary.json").read_text())


def reports(log: str) -> list[str]:
    """The SampleReport blocks of a log, in order (SFT, DPO, online DPO, KTO, PPO)."""
    return log.split("prefl samples:")[1:]


def test_pipeline_table_summary_and_frontier(pipeline):
    """DPO, KTO and PPO each beat SFT on oracle reward with a win rate vs SFT >= 0.7;
    summary.json has one entry per stage; frontier.png exists."""
    out, log, summary = pipeline
    stages = summary["stages"]
    for stage in ("sft", "dpo", "online_dpo", "kto", "ppo"):
        assert {"reward", "kl", "win_rate", "eos_rate"} <= set(stages[stage])
    for method in ("dpo", "online_dpo", "kto", "ppo"):
        assert stages[method]["reward"] > stages["sft"]["reward"]
        assert stages[method]["win_rate"] >= 0.7
        assert len(summary["frontier"][method]) >= 3  # checkpoints evaluated during training
    assert stages["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert "win vs SFT" in log
    assert (out / "frontier.png").stat().st_size > 10_000


def test_pipeline_scores_methods_against_the_exact_optimum(pipeline):
    """summary.json holds the exact optimal curve, best-of-n and, per stage, R*(KL paid) and
    frontier_efficiency = reward / R*; DPO and PPO sit on or under the curve (up to sampling
    noise); the table prints both, and the SFT NLL next to the generator's."""
    from prefl.tasks.toy_optimum import frontier_reward_at

    _, log, summary = pipeline
    curve = summary["optimum"]["frontier"]
    assert len(curve) == 60 and len(summary["optimum"]["best_of_n"]) == 8
    for method in ("dpo", "online_dpo", "kto", "ppo"):
        point = summary["stages"][method]
        best = frontier_reward_at(point["kl"], curve)
        assert point["optimal_reward"] == pytest.approx(best, abs=1e-12)
        assert point["frontier_efficiency"] == pytest.approx(point["reward"] / best, abs=1e-12)
        assert 0.5 < point["frontier_efficiency"] < 1.05
        assert 0.0 < point["gain_efficiency"] < 1.1
    # KTO learns from the same pairs read as unpaired rows: within 0.05 of DPO's efficiency
    # (measured: 0.913 against DPO's 0.831)
    stages = summary["stages"]
    assert stages["kto"]["frontier_efficiency"] >= stages["dpo"]["frontier_efficiency"] - 0.05
    # online DPO labels its own samples as it trains: measured 0.967 of R*(KL) (target 0.95;
    # 0.01 below it for the rounding of another CPU), where offline DPO reaches 0.831
    assert stages["online_dpo"]["frontier_efficiency"] >= 0.94
    assert summary["sft_entropy"]["ratio"] < 1.01
    assert "R*(KL)" in log and "SFT held-out NLL" in log


def test_toy_sft_meets_the_quality_bar(pipeline):
    """Well-formed samples (EOS) >= 95% and mean oracle reward within 0.05 of the corpus's."""
    out, log, _ = pipeline
    sft = reports(log)[0]
    assert figure(sft, r"EOS rate\s+([\d.]+)") >= 0.95
    assert abs(figure(sft, r"gap ([-+][\d.]+)")) <= 0.05
    export = out / "runs/toy/sft/export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()


def test_toy_dpo_from_the_sft_export(pipeline):
    """DPO: held-out pair accuracy >= 0.85, oracle reward +0.3 over the SFT model's samples,
    samples still well formed; KL is reported."""
    out, log, _ = pipeline
    dpo = reports(log)[1]
    assert figure(dpo, r"pair accuracy \(implicit reward\) ([\d.]+)") >= 0.85
    assert figure(dpo, r"gain ([-+][\d.]+)") >= 0.3
    assert figure(dpo, r"EOS rate\s+([\d.]+)") >= 0.95
    assert figure(dpo, r"KL\(policy \|\| reference\) ([\d.]+)") > 0
    assert (out / "runs/toy/dpo/export/model.safetensors").exists()


def test_toy_reward_model_and_predict(pipeline):
    """Reward model: held-out pair accuracy >= 0.90 and Spearman >= 0.8 with the oracle; the
    export carries reward statistics; `prefl predict` writes one JSON line per test pair."""
    out, log, summary = pipeline
    assert summary["reward_model"]["pair_accuracy"] >= 0.90
    assert summary["reward_model"]["spearman"] >= 0.8
    assert "Spearman" in log
    export = out / "runs/toy/reward/export"
    stats = json.loads((export / "reward_stats.json").read_text())
    assert stats["count"] == 512 and stats["std"] > 0
    run_prefl(
        "configs/toy/reward.yaml", out, "--model.init_args.model", str(export), subcommand="predict"
    )
    rows = [json.loads(line) for line in (out / "runs/toy/reward/predictions.jsonl").open()]
    assert [r["index"] for r in rows] == list(range(256))
    accuracy = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows)
    assert accuracy >= 0.85  # the test split, scored by the exported model


def test_toy_ppo_against_the_reward_model(pipeline):
    """PPO against the learned reward model: oracle reward +0.4 over SFT at KL <= 10 nats, with
    >= 95% of samples well formed."""
    _, _, summary = pipeline
    stages = summary["stages"]
    assert stages["ppo"]["reward"] - stages["sft"]["reward"] >= 0.4
    assert stages["ppo"]["kl"] <= 10.0
    assert stages["ppo"]["eos_rate"] >= 0.95


EXPECTED_TAGS = {
    "sft": {
        "train/loss_step",
        "val/loss",
        "val/perplexity",
        "val/token_accuracy",
        "samples/eos_rate",
        "samples/reward",
    },
    "reward": {
        "train/loss",
        "val/accuracy",
        "val/margin",
        "val/reward_std",
        "reward_report/spearman",
    },
    "dpo": {
        "train/loss_step",
        "val/rewards/accuracies",
        "val/rewards/margins",
        "val/logps/chosen",
        "eval/reward",
        "eval/kl",
        "eval/win_rate",
    },
    "online_dpo": {
        "train/loss_step",
        "train/online/score_epoch",
        "train/online/kl_epoch",
        "train/online/eos_rate_epoch",
        "train/online/ties_epoch",
        "val/online/score",
        "val/rewards/accuracies",
        "eval/reward",
    },
    "kto": {
        "train/loss_step",
        "val/loss",
        "val/kl",
        "val/rewards/chosen",
        "val/rewards/rejected",
        "eval/reward",
        "eval/kl",
    },
    "ppo": {
        "ppo/score",
        "ppo/kl",
        "ppo/entropy",
        "ppo/clip_frac",
        "ppo/approx_kl",
        "ppo/value_loss",
        "ppo/explained_variance",
        "ppo/eos_rate",
        "eval/reward",
    },
}


@pytest.mark.parametrize("stage", sorted(EXPECTED_TAGS))
def test_tensorboard_logs_hold_the_expected_tags(pipeline, stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = pipeline
    scalars, texts = set(), set()
    for path in (out / "runs/toy" / stage).rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        scalars |= set(events.Tags()["scalars"])
        texts |= set(events.Tags()["tensors"])
    assert EXPECTED_TAGS[stage] <= scalars, EXPECTED_TAGS[stage] - scalars
    if stage in ("sft", "dpo", "online_dpo", "kto", "ppo"):
        assert any("samples" in tag for tag in texts), texts


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ppo_oracle", "rloo", "grpo"])
def test_toy_rl_runs_raise_the_oracle_reward(config, pipeline):
    """PPO against the oracle, RLOO and GRPO: each raises the mean oracle reward of held-out
    samples by >= 0.4 over the SFT model's, at a sequence KL <= 10 nats, with >= 95% of samples
    well formed (ending in EOS)."""
    out, _, _ = pipeline
    log = run_prefl(f"configs/toy/{config}.yaml", out)
    assert figure(log, r"gain ([-+][\d.]+)") >= 0.4
    assert figure(log, r"KL\(policy \|\| reference\) ([-\d.]+)") <= 10.0
    assert figure(log, r"EOS rate\s+([\d.]+)") >= 0.95
    assert (out / f"runs/toy/{config}/export/model.safetensors").exists()


def test_sweep_adds_frontier_curves(pipeline, monkeypatch):
    """`--sweep` runs DPO per β and PPO per KL coefficient and plots both curves (one value
    each here, to keep the test short)."""
    import prefl.pipeline as pipeline_module

    out, _, summary = pipeline
    monkeypatch.setattr(pipeline_module, "DPO_BETAS", (0.25,))
    monkeypatch.setattr(pipeline_module, "KTO_BETAS", ())
    monkeypatch.setattr(pipeline_module, "ONLINE_DPO_BETAS", ())
    monkeypatch.setattr(pipeline_module, "PPO_KL_COEFS", (0.2,))
    monkeypatch.chdir(out)
    summary = dict(summary)
    pipeline_module.run_sweep(summary)
    (dpo,), (ppo,) = summary["sweep"]["dpo"], summary["sweep"]["ppo"]
    assert dpo["beta"] == 0.25 and ppo["kl_coef"] == 0.2
    assert dpo["reward"] > summary["stages"]["sft"]["reward"] and dpo["kl"] > 0
    assert ppo["reward"] > summary["stages"]["sft"]["reward"] and ppo["kl"] > 0
    pipeline_module.add_optimum(summary)
    assert 0.0 < dpo["frontier_efficiency"] < 1.05 and 0.0 < ppo["frontier_efficiency"] < 1.05
    pipeline_module.plot_frontier(summary, out / "frontier_sweep.png")
    assert (out / "frontier_sweep.png").stat().st_size > 10_000


def test_a_stage_fitted_in_a_worker_equals_the_same_stage_fitted_here(
    pipeline, tmp_path, monkeypatch
):
    """On 2 cores the main job fits the stages after SFT in two worker processes: DPO fitted
    again in this process from the same SFT export (one thread, as in the workers) gives the
    very same frontier points, and a stage with a log file writes its output there (here the
    progress bars; Lightning's log handler was made before, on pytest's capture)."""
    from prefl.pipeline import run_stage

    out, log, summary = pipeline
    assert "prefl toy: dpo done in" in log and "===== dpo (runs/toy/dpo.log) =====" in log
    assert "prefl samples:" in (out / "runs/toy/dpo.log").read_text()  # the worker's report
    shutil.copytree(out / "runs/toy/sft/export", tmp_path / "runs/toy/sft/export")
    monkeypatch.chdir(tmp_path)
    result = run_stage("dpo", tmp_path / "dpo.log")
    assert result["frontier"] == summary["frontier"]["dpo"]
    assert "prefl: tokenizing train" in (tmp_path / "dpo.log").read_text()
