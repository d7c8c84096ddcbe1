"""Thin LightningModules wiring a model to a loss and its metrics."""

from prefl.modules.base import CausalLMModule
from prefl.modules.dpo import DPOModule
from prefl.modules.kto import KTOModule
from prefl.modules.online_dpo import OnlineDPOModule
from prefl.modules.ppo import PPOModule
from prefl.modules.reward import RewardModule
from prefl.modules.sample import SampleModule
from prefl.modules.sft import SFTModule

__all__ = [
    "CausalLMModule",
    "DPOModule",
    "KTOModule",
    "OnlineDPOModule",
    "PPOModule",
    "RewardModule",
    "SampleModule",
    "SFTModule",
]
