"""Kill and resume, determinism, and safe checkpoints (issue 8, items 3–5).

For SFT, DPO, the reward model and PPO (GAE, adaptive KL controller), one script trains on the toy
task for 2 epochs (several batches each) with a checkpoint every 2 optimizer steps
(``save_last``). Runs:

* **full** (twice, in-process): uninterrupted; the two must agree exactly (same seed, CPU): the
  determinism guarantee.
* **kill** (a subprocess): the same run, killed with ``SIGKILL`` from inside right after an
  optimizer step in the middle of the second epoch, one step after a checkpoint was written;
* **resume** (in-process): a fresh process state resumed with ``ckpt_path="last"``.

The resumed run must end with the same weights, validation metrics and last-step metrics as
the uninterrupted one (training metrics averaged over the interrupted epoch cover only the
batches after the resume, as in Lightning generally): the data position (the batches of the
interrupted epoch already seen are skipped, in the same seeded order), the optimizer, the
learning-rate schedule, PPO's KL controller, update counter and RNG states all come back. Every
checkpoint loads with ``torch.load(weights_only=True)`` (no pickled classes). A truncated
``last.ckpt`` is refused with an error naming the intact checkpoints beside it, and the previous
checkpoint still resumes to the same end.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("resume_run.py")
KINDS = ("sft", "dpo", "reward", "ppo", "online_dpo")
# kill after this optimizer step, mid second epoch; LAST: the step of the last checkpoint before
# (6 steps per epoch; PPO: 4 rollouts of 2 optimizer steps, a checkpoint every 2 rollouts)
KILL_AT = {"sft": 9, "dpo": 9, "reward": 9, "ppo": 14, "online_dpo": 9}
LAST = {"sft": 8, "dpo": 8, "reward": 8, "ppo": 12, "online_dpo": 8}


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("resume_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runner():
    return _load_script()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_dir, runner):
    """Per kind: two full runs and a killed run's checkpoint folder."""
    root = tmp_path_factory.mktemp("resume")
    out = {}
    for kind in KINDS:
        kill_dir = root / kind / "kill"
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(kill_dir), sft_dir, kind, str(KILL_AT[kind])],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        out[kind] = {
            "full": runner.run(root / kind / "full", sft_dir, kind),
            "full2": runner.run(root / kind / "full2", sft_dir, kind),
            "kill_dir": kill_dir,
        }
    return out


def _resumable(name: str) -> bool:
    """Metrics a resumed run must reproduce: validation, per-step and PPO values. A training
    metric aggregated over the interrupted epoch covers only its batches after the resume
    (Lightning does not checkpoint torchmetrics' running sums), so it is left out."""
    return name.startswith(("val/", "ppo/")) or name.endswith("_step")


def _assert_same_end(a, b, exact=False):
    assert a["global_step"] == b["global_step"]
    assert a["epoch"] == b["epoch"]
    assert set(a["metrics"]) == set(b["metrics"])
    for name, value in a["metrics"].items():
        if not exact and not _resumable(name):
            continue
        if exact:
            assert b["metrics"][name] == value, name
        else:
            assert b["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    for name, value in a["weights"].items():
        diff = (value - b["weights"][name]).abs().max().item()
        assert diff == 0.0 if exact else diff < 1e-6, (name, diff)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_run(runs, kind):
    """Determinism: two uninterrupted runs from the same seed agree bit for bit."""
    _assert_same_end(runs[kind]["full"], runs[kind]["full2"], exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_killed_run_resumes_to_the_same_end(runs, kind, runner, sft_dir):
    kill_dir = runs[kind]["kill_dir"]
    ckpts = sorted(p.name for p in (kill_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts
    last = torch.load(kill_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == LAST[kind]  # progress after it was lost
    resumed = runner.run(kill_dir, sft_dir, kind, ckpt="last")
    _assert_same_end(runs[kind]["full"], resumed)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_loads_weights_only(runs, kind):
    """No pickled classes in any checkpoint: hyperparameters, loop and callback states, PPO's
    controller and RNG states all load under ``weights_only=True``."""
    files = list((runs[kind]["kill_dir"] / "checkpoints").glob("*.ckpt"))
    assert len(files) >= 3
    for path in files:
        checkpoint = torch.load(path, weights_only=True)
        assert isinstance(checkpoint["hyper_parameters"]["model"], str | dict)


@pytest.mark.slow
def test_truncated_last_checkpoint_is_refused_and_the_previous_one_resumes(
    runs, runner, sft_dir, tmp_path
):
    from prefl.training.checkpoints import CorruptCheckpointError

    work = tmp_path / "dpo"
    shutil.copytree(runs["dpo"]["kill_dir"], work)
    last = work / "checkpoints" / "last.ckpt"
    previous = work / "checkpoints" / "epoch=1-step=8.ckpt"
    assert previous.is_file()
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # half-written
    with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt.*truncated or corrupt") as err:
        runner.run(work, sft_dir, "dpo", ckpt="last")
    assert "epoch=1-step=8.ckpt" in str(err.value)
    resumed = runner.run(work, sft_dir, "dpo", ckpt=str(previous))
    _assert_same_end(runs["dpo"]["full"], resumed)


def test_checkpoint_problem_cases(tmp_path):
    from prefl.training.checkpoints import check_checkpoint, checkpoint_problem

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, good)
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(tmp_path / "missing.ckpt") == "no such file"
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    assert "truncated or corrupt" in checkpoint_problem(text)
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    assert checkpoint_problem(folder) == "sharded checkpoint without .metadata"
    (folder / ".metadata").write_bytes(b"x")
    assert checkpoint_problem(folder) is None
    check_checkpoint(None)  # nothing to resume from
    check_checkpoint("s3://bucket/run.ckpt")  # remote: left to Lightning
