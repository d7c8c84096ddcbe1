"""Models and loaders: Hugging Face causal LMs, LoRA wiring, tokenizers (incl. the toy one)."""

from prefl.models.causal_lm import (
    TOY_MODEL_CONFIG,
    CausalLMSpec,
    align_with_tokenizer,
    build_causal_lm,
    disable_dropout,
)
from prefl.models.lora import LoraSpec, apply_lora, is_lora, merge_lora
from prefl.models.reward import RewardModel, build_reward_model
from prefl.models.tokenizers import build_toy_tokenizer, load_tokenizer

__all__ = [
    "TOY_MODEL_CONFIG",
    "CausalLMSpec",
    "LoraSpec",
    "RewardModel",
    "align_with_tokenizer",
    "apply_lora",
    "build_causal_lm",
    "build_reward_model",
    "build_toy_tokenizer",
    "disable_dropout",
    "is_lora",
    "load_tokenizer",
    "merge_lora",
]
