"""Long-run health: a few hundred steps of DPO and PPO on the toy task without leaks.

Each run is a fresh process (``tests/soak_run.py``: in a long pytest process, memory freed by
earlier tests is reused and would hide a leak) that samples its resident memory (RSS) and open
file descriptors every 25 training batches. After a warm-up (allocator pools, lazily created
buffers, the first checkpoint), RSS must stay flat: the growth from the first sample after
warm-up to the last must stay under a few MiB — a leak of one batch's tensors per step (the toy
batch holds ~10 KiB of ids, a DPO step's activations ~1 MiB) would exceed it many times over.
The number of open file descriptors must not grow at all (checkpoints and TensorBoard event files
are written during the run, so leaked handles would show). A deliberate 256 KiB-per-step leak
must fail the same check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("soak_run.py")
WARMUP = 100
RSS_SLACK_MIB = 8.0


def _soak(tmp_path, sft_dir, kind, steps, leak=False):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), sft_dir, kind, str(steps),
         "leak" if leak else "clean"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = json.loads(proc.stdout.strip().splitlines()[-1])
    after = [s for s in samples if s[0] >= WARMUP]
    assert len(after) >= 4, samples
    return after[-1][1] - after[0][1], after


def _check(growth, after):
    assert growth < RSS_SLACK_MIB, f"RSS grew {growth:.1f} MiB: {after}"
    assert max(s[2] for s in after) <= after[0][2], f"file descriptors grew: {after}"


@pytest.mark.slow
def test_dpo_soak(sft_dir, tmp_path):
    _check(*_soak(tmp_path, sft_dir, "dpo", 300))


@pytest.mark.slow
def test_ppo_soak(sft_dir, tmp_path):
    _check(*_soak(tmp_path, sft_dir, "ppo", 200))


@pytest.mark.slow
def test_the_soak_check_catches_a_leak(sft_dir, tmp_path):
    growth, after = _soak(tmp_path, sft_dir, "dpo", 300, leak=True)
    assert growth > 4 * RSS_SLACK_MIB, after  # 200 steps x 256 KiB = 50 MiB
    with pytest.raises(AssertionError, match="RSS grew"):
        _check(growth, after)
