"""prefl: preference tuning of language models (SFT, reward model, DPO, PPO) on Lightning.

The public API; see the README for a tour.
"""

from prefl.callbacks import HFExport, SampleReport
from prefl.data import PreferenceDataModule
from prefl.functional import masked_mean, sequence_logps
from prefl.models import CausalLMSpec, LoraSpec, build_causal_lm, load_tokenizer
from prefl.modules import SFTModule

__version__ = "0.1.0"

__all__ = [
    "CausalLMSpec",
    "HFExport",
    "LoraSpec",
    "PreferenceDataModule",
    "SFTModule",
    "SampleReport",
    "build_causal_lm",
    "load_tokenizer",
    "masked_mean",
    "sequence_logps",
]
