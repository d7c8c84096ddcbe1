"""Test-wide settings (one torch thread per process, no download-count pings) and the fixtures
tests share: the toy tokenizer and model, a toy SFT export, the real HH data, a float assertion.

The toy models are far too small to gain from intra-op threads, and on a 2-core machine several
processes (pytest, a CLI run, two DDP ranks) each spinning two threads slow each other down by an
order of magnitude. Subprocesses inherit ``OMP_NUM_THREADS``.
"""

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# `datasets` pings the hub to count a download on every local load: 3-5 s each when offline
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests, whatever an earlier module set (tiny matmuls
    run several times faster on one thread than on two on a busy machine); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The toy word-level tokenizer, ``load_tokenizer("toy")``, one per test module."""
    from prefl.data import load_tokenizer

    return load_tokenizer("toy")


@pytest.fixture(scope="module")
def model(tok):
    """The toy Llama, random init after ``torch.manual_seed(0)``, in eval mode, one per module
    (tests that hook or switch it restore it)."""
    from prefl.models import CausalLMSpec, build_causal_lm

    torch.manual_seed(0)
    return build_causal_lm(CausalLMSpec(config="toy"), tok).eval()


@pytest.fixture(scope="session")
def assert_close():
    """``assert_close(actual, expected, tol=1e-6)``: ``expected`` (cast to ``actual``'s dtype) has
    ``actual``'s shape and every element is within ``tol`` of it (absolute, ``rtol=0``)."""

    def check(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
        expected = torch.as_tensor(expected, dtype=actual.dtype)
        assert actual.shape == expected.shape
        assert torch.allclose(actual.detach(), expected, rtol=0.0, atol=tol), (
            f"actual={actual.detach().tolist()} expected={expected.tolist()}"
        )

    return check


@pytest.fixture(scope="session")
def quiet_trainer():
    """``quiet_trainer(root, **kwargs)``: a CPU ``Trainer`` writing nothing but what a test asks
    for (no logger, checkpoints, progress bar, model summary or sanity validation) under
    ``root``; ``kwargs`` add to or override these."""
    from lightning.pytorch import Trainer

    def build(root, **kwargs):
        settings = {
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": root,
        }
        return Trainer(**{**settings, **kwargs})

    return build


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """A toy 'SFT export' on disk (random-init toy Llama, seed 0, and the toy tokenizer): the
    source that DPO, reward and PPO tests load their policy, reference, reward or value model
    from."""
    from prefl.data import load_tokenizer
    from prefl.models import CausalLMSpec, build_causal_lm

    torch.manual_seed(0)
    tok = load_tokenizer("toy")
    model = build_causal_lm(CausalLMSpec(config="toy"), tok)
    out = tmp_path_factory.mktemp("sft")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _shared_data_dir() -> Path:
    """``$PREFL_SHARED_DATA`` if set, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("PREFL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def hh_path() -> Path:
    """The real Anthropic HH harmless test split (2,312 implicit-prompt rows); the test skips where
    the file is absent (set ``PREFL_SHARED_DATA`` to the folder that holds it)."""
    path = _shared_data_dir() / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent (set PREFL_SHARED_DATA or check out ../shared/data)")
    return path


@pytest.fixture(scope="session")
def hh_rows(hh_path) -> list[dict]:
    """The rows of ``hh_path``, parsed."""
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
