"""Smoke tests of the prefl-vs-TRL benchmarks (``benchmarks/*_vs_trl.py``): each script's ``main``
runs both libraries once on a few steps and writes a JSON report with both sides' numbers.
Those are skipped where TRL is not installed (CI does not install the ``bench`` extra); the
tests of the pure helpers of the layout benchmarks (HH rows, token accounting) always run."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--steps", "3", "--warmup", "1", "--batch", "2", "--repeats", "1", "--threads", "1"]
needs_trl = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="TRL is not installed (bench extra)"
)
sys.path.insert(0, str(BENCHMARKS))


@needs_trl
@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("dpo_vs_trl", []),
        ("reward_vs_trl", ["--group-by-length"]),
        ("rloo_vs_trl", ["--num-generations", "2", "--max-new-tokens", "4"]),
    ],
)
def test_benchmark_reports_both_libraries(
    script: str, extra: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    out = tmp_path / f"{script}.json"
    module.main([*TINY, *extra, "--json", str(out)])

    report = json.loads(out.read_text())
    assert report["name"] == script
    assert [r["lib"] for r in report["runs"]] == ["prefl", "trl"]
    for run in report["runs"]:
        assert run["steps"] == 3 and run["timed_steps"] == 2
        assert run["throughput"] > 0 and run["peak_rss_mib"] > 0
        assert run["torch_threads"] == 1 and run["dtype"] == "torch.float32"
        # each worker imports only its own library
        assert run["imported"]["trl"] == (run["lib"] == "trl")
        assert run["imported"]["lightning"] == (run["lib"] == "prefl")
    summary = report["summary"]
    for lib in ("prefl", "trl"):
        assert summary[lib]["throughput"] > 0 and summary[lib]["peak_rss_mib"] > 0
    assert summary["ratio_throughput"] > 0 and summary["ratio_peak_rss"] > 0
    assert report["machine"]["versions"]["trl"] and report["machine"]["cpu_count"]
    if script == "rloo_vs_trl":  # same completion length on both sides
        assert summary["prefl"]["mean_completion_tokens"] <= 4
        assert summary["trl"]["mean_completion_tokens"] <= 4


def test_hh_rows_converts_with_prefls_parser_and_counts_skips() -> None:
    from hh_data import hh_rows

    good = {
        "chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: fine",
        "rejected": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no",
    }
    empty = {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    rows, skipped = hh_rows([good, empty, good])
    assert len(rows) == 2 and dict(skipped) == {"empty_reply": 1}
    assert [m["role"] for m in rows[0]["prompt"]] == ["user", "assistant", "user"]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "fine"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "no"}]


def test_fits_and_flop_split() -> None:
    from hh_data import HH_MODEL_CONFIG, fits, flop_split

    assert fits((256, 256, 10), max_length=512, max_prompt_length=256)
    assert not fits((257, 1, 1), max_length=512, max_prompt_length=256)
    assert not fits((100, 50, 413), max_length=512, max_prompt_length=256)
    split = flop_split(HH_MODEL_CONFIG, vocab_size=49152)
    assert split["body_mflop"] == pytest.approx(70.78, abs=0.01)
    assert split["head_mflop"] == pytest.approx(56.62, abs=0.01)
    assert split["body_share"] > 0.5


EXAMPLES = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
    {"prompt_ids": [5], "chosen_ids": [8, 9, 11, 12], "rejected_ids": [10, 13]},
]


@pytest.mark.parametrize(
    ("packing", "share", "real", "computed"),
    [(False, False, 17, 4 * 5), (True, False, 17, 2 * 10), (False, True, 13, 2 * 7)],
)
def test_batch_tokens_of_prefl_layouts(
    packing: bool, share: bool, real: int, computed: int
) -> None:
    from hh_data import batch_tokens

    from prefl.data import PreferenceCollator

    collate = PreferenceCollator(0, "pairs", packing=packing, share_prompt=share, row_length=10)
    counts = batch_tokens(EXAMPLES, collate(EXAMPLES))
    # data: (3+2) + (3+1) + (1+4) + (1+2) tokens, whatever the layout; padded: 4 rows of 5;
    # packed: units of 5, 5, 4, 3 on 2 rows of 10; shared: rows of 3+2+1 and 1+4+2 (prompt once)
    assert counts == {"data": 17, "real": real, "computed": computed}


def test_batch_tokens_of_trl_style_batches() -> None:
    from hh_data import batch_tokens, sequence_tokens

    reward = [{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2]}]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = {"input_ids": torch.zeros(2, 3), "attention_mask": mask}
    assert batch_tokens(reward, batch) == {"data": 5, "real": 5, "computed": 6}
    assert sequence_tokens({"prompt_ids": [1, 2], "completion_ids": [3]}) == 3


def test_timed_tokens_and_token_result_skip_the_warmup() -> None:
    from layout_report import timed_tokens, token_result

    counts = [{"data": 100, "real": 100, "computed": 200}] + [
        {"data": 10, "real": 8, "computed": 10}
    ] * 3
    assert timed_tokens(counts, steps=4, warmup=1) == {
        "data": 30.0,
        "real": 24.0,
        "computed": 30.0,
        "padding_share": pytest.approx(0.2),
    }
    result = token_result(counts, ends=[1.0, 2.0, 3.0, 4.0], cpu=[0, 2, 4, 6], warmup=1)
    assert result["data_tokens_per_s"] == pytest.approx(10.0)
    assert result["data_tokens_per_cpu_s"] == pytest.approx(5.0)


def test_toy_mean_tokens_and_hh_defaults() -> None:
    from hh_workers import toy_mean_tokens

    rows = [{"prompt": "a b", "chosen": " c", "rejected": " d e"}]
    assert toy_mean_tokens(rows, ("chosen", "rejected")) == [3.0, 2.0, 3.0]
    module = importlib.import_module("dpo_vs_trl")
    assert module.HH_VARIANTS[-1] == "trl_grouped"
