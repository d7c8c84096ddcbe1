"""prefl: preference tuning of language models (SFT, reward model, DPO, PPO) on Lightning.

The public API, loaded lazily so that ``import prefl.functional`` or ``import prefl.losses``
pulls in torch alone; the manual is in ``docs/``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CausalLMSpec": "prefl.models",
    "DPOModule": "prefl.modules",
    "EvalCallback": "prefl.callbacks",
    "HFExport": "prefl.callbacks",
    "KTOModule": "prefl.modules",
    "LoraSpec": "prefl.models",
    "OnlineDPOModule": "prefl.modules",
    "PPOModule": "prefl.modules",
    "PreferenceDataModule": "prefl.data",
    "RewardModel": "prefl.models",
    "RewardModule": "prefl.modules",
    "RewardReport": "prefl.callbacks",
    "RewardWriter": "prefl.callbacks",
    "SFTModule": "prefl.modules",
    "SampleModule": "prefl.modules",
    "SampleReport": "prefl.callbacks",
    "SampleWriter": "prefl.callbacks",
    "WarmupCosineLR": "prefl.training",
    "build_causal_lm": "prefl.models",
    "load_tokenizer": "prefl.data",
    "masked_mean": "prefl.functional",
    "sequence_logps": "prefl.functional",
    "bradley_terry_loss": "prefl.losses",
    "dpo_loss": "prefl.losses",
    "kto_loss": "prefl.losses",
}
__all__ = [
    "CausalLMSpec",
    "DPOModule",
    "EvalCallback",
    "HFExport",
    "KTOModule",
    "LoraSpec",
    "OnlineDPOModule",
    "PPOModule",
    "PreferenceDataModule",
    "RewardModel",
    "RewardModule",
    "RewardReport",
    "RewardWriter",
    "SFTModule",
    "SampleModule",
    "SampleReport",
    "SampleWriter",
    "WarmupCosineLR",
    "bradley_terry_loss",
    "build_causal_lm",
    "dpo_loss",
    "kto_loss",
    "load_tokenizer",
    "masked_mean",
    "sequence_logps",
]

if TYPE_CHECKING:
    from prefl.callbacks import (
        EvalCallback,
        HFExport,
        RewardReport,
        RewardWriter,
        SampleReport,
        SampleWriter,
    )
    from prefl.data import PreferenceDataModule, load_tokenizer
    from prefl.functional import masked_mean, sequence_logps
    from prefl.losses import bradley_terry_loss, dpo_loss, kto_loss
    from prefl.models import CausalLMSpec, LoraSpec, RewardModel, build_causal_lm
    from prefl.modules import (
        DPOModule,
        KTOModule,
        OnlineDPOModule,
        PPOModule,
        RewardModule,
        SampleModule,
        SFTModule,
    )
    from prefl.training import WarmupCosineLR


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
