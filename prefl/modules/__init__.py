"""Thin LightningModules wiring a model to a loss and its metrics."""

from prefl.modules.base import CausalLMModule
from prefl.modules.sft import SFTModule

__all__ = ["CausalLMModule", "SFTModule"]
