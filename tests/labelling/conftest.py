"""Fixtures of the labelling tests (``prefl pairs``, ``prefl label``): samples files as
``SampleWriter`` writes them, a chat tokenizer (offline, ChatML) for conversational rows, and a
toy reward-model export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # offline_tokenizers

#: A completion that a page showing it as HTML would run: it must be displayed as text.
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def write_samples(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` (prompt, completions, ...) as a samples file, ``meta`` added."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"meta": {"model": "toy", "seed": 0}, **row}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_tok():
    """A byte-level BPE tokenizer with a ChatML template (``tests/data/offline_tokenizers``)."""
    from offline_tokenizers import byte_level_bpe

    return byte_level_bpe()


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory):
    """A toy reward-model export: random-init toy Llama with a scalar head (seed 1)."""
    from prefl.data import load_tokenizer
    from prefl.models import CausalLMSpec
    from prefl.models.reward import RewardModel, build_reward_model

    torch.manual_seed(1)
    tok = load_tokenizer("toy")
    rm = RewardModel(build_reward_model(CausalLMSpec(config="toy"), tok), tok)
    return str(rm.save_pretrained(tmp_path_factory.mktemp("rm")))
