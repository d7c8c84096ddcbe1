"""Models and loaders: Hugging Face causal LMs, LoRA wiring, sharding."""

from prefl.models.causal_lm import (
    TOY_MODEL_CONFIG,
    CausalLMSpec,
    align_with_tokenizer,
    build_causal_lm,
    disable_dropout,
)
from prefl.models.lora import LoraSpec, apply_lora, is_lora, merge_lora
from prefl.models.reward import RewardModel, build_reward_model

__all__ = [
    "TOY_MODEL_CONFIG",
    "CausalLMSpec",
    "LoraSpec",
    "RewardModel",
    "align_with_tokenizer",
    "apply_lora",
    "build_causal_lm",
    "build_reward_model",
    "disable_dropout",
    "is_lora",
    "merge_lora",
]
