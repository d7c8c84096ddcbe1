"""benchmarks/segment_attention.py: its baselines compute the attention prefl computes (so the
timings compare like with like), and a tiny run writes its table's numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import segment_attention as bench  # noqa: E402

from prefl.functional.segments import row_spans, segment_attention  # noqa: E402
from prefl.models.packed import layout_mask  # noqa: E402


def test_the_baselines_equal_prefls_attention_with_gradients():
    segment, branch = bench.hh_row(pairs=3, seed=1)
    length = segment.shape[1]
    assert segment.max().item() == 2 and set(branch.unique().tolist()) == {0, 1, 2}
    torch.manual_seed(0)
    q = torch.randn(1, bench.HEADS, length, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, bench.KV_HEADS, length, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, bench.KV_HEADS, length, 8, dtype=torch.float64, requires_grad=True)
    spans = row_spans(segment, branch)
    ours = segment_attention(q, k, v, spans)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    for other in (
        bench.sliced_attention(q, k, v, spans),
        bench.dense_attention(q, k, v, layout_mask(segment, branch)),
    ):
        torch.testing.assert_close(other, ours, rtol=1e-10, atol=1e-10)
        other_grads = torch.autograd.grad(other.square().sum(), (q, k, v))
        for got, want in zip(other_grads, grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_tiny_run_writes_every_variants_median(tmp_path):
    out = tmp_path / "segment_attention.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--pairs", "2", "--rounds", "1", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script sets the process's threads
    payload = json.loads(out.read_text())
    assert sorted(payload["median_s"]) == ["dense", "prefl", "sliced"]
    assert all(len(t) == 1 and t[0] > 0 for t in payload["times_s"].values())
    assert payload["config"]["row_tokens"] > 0
