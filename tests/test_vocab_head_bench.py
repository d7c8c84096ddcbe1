"""benchmarks/vocab_head.py: both variants compute the same log-probs and gradient, and a tiny
run writes its table's numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vocab_head as bench  # noqa: E402


def test_the_variants_agree_with_and_without_gradients():
    inputs = bench.make_inputs(tokens=30, targets=9, seed=1)
    bench.check_equal(inputs)  # raises if the log-probs or the dense gradients differ
    _, plain, plain_grad = bench.run("plain", inputs, grad=False)
    _, ours, ours_grad = bench.run("prefl", inputs, grad=False)
    assert plain_grad is None and ours_grad is None  # the reference pass builds no gradient
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-4)


def test_a_tiny_run_writes_every_passes_medians(tmp_path):
    out = tmp_path / "vocab_head.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--tokens", "30", "--targets", "9", "--rounds", "1", "--threads", "1",
                    "--json", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the script sets the process's threads
    payload = json.loads(out.read_text())
    assert sorted(payload["median_s"]) == [
        "policy/plain", "policy/prefl", "reference/plain", "reference/prefl"
    ]  # fmt: skip
    assert all(len(t) == 1 and t[0] > 0 for t in payload["times_s"].values())
    assert payload["config"]["vocab"] == 49152
