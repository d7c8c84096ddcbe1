"""prefl: preference tuning of language models (SFT, reward model, DPO, PPO) on Lightning.

The public API, loaded lazily so that ``import prefl.functional`` or ``import prefl.losses``
pulls in torch alone; see the README for a tour.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CausalLMSpec": "prefl.models",
    "DPOModule": "prefl.modules",
    "HFExport": "prefl.callbacks",
    "LoraSpec": "prefl.models",
    "PreferenceDataModule": "prefl.data",
    "SFTModule": "prefl.modules",
    "SampleReport": "prefl.callbacks",
    "WarmupCosineLR": "prefl.modules",
    "build_causal_lm": "prefl.models",
    "load_tokenizer": "prefl.models",
    "masked_mean": "prefl.functional",
    "sequence_logps": "prefl.functional",
}
__all__ = [
    "CausalLMSpec",
    "DPOModule",
    "HFExport",
    "LoraSpec",
    "PreferenceDataModule",
    "SFTModule",
    "SampleReport",
    "WarmupCosineLR",
    "build_causal_lm",
    "load_tokenizer",
    "masked_mean",
    "sequence_logps",
]

if TYPE_CHECKING:
    from prefl.callbacks import HFExport, SampleReport
    from prefl.data import PreferenceDataModule
    from prefl.functional import masked_mean, sequence_logps
    from prefl.models import CausalLMSpec, LoraSpec, build_causal_lm, load_tokenizer
    from prefl.modules import DPOModule, SFTModule, WarmupCosineLR


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
