"""Causal language models: load one by name or path, or build a tiny one from a config.

:class:`CausalLMSpec` is the typed description every module takes (so LightningCLI can build
``--help`` and YAML from it); :func:`build_causal_lm` turns it into a Hugging Face model that agrees
with the tokenizer: vocabulary large enough for the tokenizer (a pad token added by
:func:`prefl.models.load_tokenizer` grows it), pad/bos/eos ids set in the config and in the
generation config, gradient checkpointing and LoRA applied on request.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from prefl.data.tokenizers import gguf_source
from prefl.models.lora import (
    LoraSpec,
    adapter_base,
    apply_lora,
    is_adapter_dir,
    load_lora_adapter,
)
from prefl.models.sharding import building_empty

log = logging.getLogger(__name__)

#: The toy task's model: a 2-layer, 64-wide Llama (about 0.15M parameters with the toy vocab).
TOY_MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CausalLMSpec:
    """What causal LM to use and how to load it.

    Args:
        name_or_path: Hugging Face hub id or local directory (e.g. the SFT export of an earlier
            stage), loaded with ``AutoModelForCausalLM.from_pretrained``, or the path of a
            ``.gguf`` file. Leave empty to build a randomly initialised model from ``config``.
        config: Keyword arguments of ``AutoConfig.for_model`` (must hold ``model_type``) for a
            random-init model; ``"toy"`` selects :data:`TOY_MODEL_CONFIG`. The vocabulary size
            and special-token ids are taken from the tokenizer.
        dtype: Parameter dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the
            checkpoint's own). Mixed precision is the Trainer's ``precision`` setting instead.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``...; None = library default.
        trust_remote_code: Allow the checkpoint's own Python code to run. Off by default: turn it
            on only for sources you trust.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        lora: Wrap the model with LoRA adapters (needs the ``peft`` extra); None = full fine-tune.
        gguf_file: A GGUF file inside ``name_or_path`` (as ``from_pretrained(..., gguf_file=)``;
            needs the ``gguf`` extra). Its weights are dequantized to float, and the model is an
            ordinary one from then on: it trains, and exports as a safetensors directory.
        lora_adapter: A LoRA adapter saved by ``peft`` (a directory with
            ``adapter_config.json``), loaded onto the model that ``name_or_path`` names (needs
            the ``peft`` extra; the adapters stay trainable). ``name_or_path`` may also be such
            a directory itself: the base is then the one its config records.
    """

    name_or_path: str | None = None
    config: dict[str, Any] | str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraSpec | None = field(default=None)
    gguf_file: str | None = None
    lora_adapter: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # read back from a checkpoint's plain hyperparameters
            self.lora = LoraSpec(**self.lora)
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("CausalLMSpec: set exactly one of `name_or_path` and `config`")
        if self.lora is not None and (self.lora_adapter or is_adapter_dir(self.name_or_path)):
            raise ValueError("CausalLMSpec: a saved LoRA adapter is loaded as it is; unset `lora`")
        if self.dtype is not None and self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"CausalLMSpec.dtype={self.dtype!r}; expected auto or {list(_DTYPES)}")


def _resolve_dtype(dtype: str | None) -> torch.dtype | str | None:
    return dtype if dtype in (None, "auto") else _DTYPES[dtype]


def _config_kwargs(config: dict[str, Any] | str) -> dict[str, Any]:
    if config == "toy":
        return dict(TOY_MODEL_CONFIG)
    if isinstance(config, str) or "model_type" not in config:
        raise ValueError(f"CausalLMSpec.config must be 'toy' or a dict with model_type: {config!r}")
    return dict(config)


def build_causal_lm(
    spec: CausalLMSpec | str, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel | torch.nn.Module:
    """Build the causal LM described by ``spec``, made consistent with ``tokenizer``.

    Args:
        spec: A :class:`CausalLMSpec`, or a string taken as ``CausalLMSpec(name_or_path=...)``.
        tokenizer: The tokenizer of the run (with a PAD, which may be its EOS; see
            :func:`prefl.data.load_tokenizer`).

    Returns:
        The model in train mode (LoRA-wrapped if ``spec.lora`` is set or a saved adapter is
        loaded).
    """
    return build_hf_model(spec, tokenizer, AutoModelForCausalLM)


def build_hf_model(
    spec: CausalLMSpec | str,
    tokenizer: PreTrainedTokenizerBase,
    auto_class: type = AutoModelForCausalLM,
    lora_task: str = "CAUSAL_LM",
    **config_kwargs: Any,
) -> PreTrainedModel | torch.nn.Module:
    """Build ``spec`` with a Hugging Face auto class (causal LM, sequence classifier, ...).

    Args:
        spec: What to load or build (a string is a name or path).
        tokenizer: The run's tokenizer; vocabulary and special-token ids follow it.
        auto_class: ``AutoModelForCausalLM`` or ``AutoModelForSequenceClassification``.
        lora_task: ``peft`` task type of the LoRA wrapper (``CAUSAL_LM`` or ``SEQ_CLS``).
        **config_kwargs: Extra config values (e.g. ``num_labels=1``).
    """
    if isinstance(spec, str):
        spec = CausalLMSpec(name_or_path=spec)
    adapter = spec.lora_adapter
    if adapter is None and is_adapter_dir(spec.name_or_path):  # the base its config records
        adapter = spec.name_or_path
        spec = dataclasses.replace(spec, name_or_path=adapter_base(adapter))
    dtype = _resolve_dtype(spec.dtype)
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation is not None:
        common["attn_implementation"] = spec.attn_implementation
    if spec.name_or_path is not None:
        source, gguf_file = gguf_source(spec.name_or_path, spec.gguf_file)
        if gguf_file is not None:
            common["gguf_file"] = gguf_file
    if spec.name_or_path is not None and building_empty():
        # ranks other than 0 under sharding: the architecture only, weights come by broadcast
        config = AutoConfig.from_pretrained(source, **config_kwargs, **common)
        explicit = {"dtype": dtype} if isinstance(dtype, torch.dtype) else {}  # else config's
        common.pop("gguf_file", None)
        model = auto_class.from_config(config, **explicit, **common)
    elif spec.name_or_path is not None:
        model = auto_class.from_pretrained(source, dtype=dtype, **config_kwargs, **common)
        model.train()  # from_pretrained returns eval mode; Lightning does not switch it back
        dequantized(model)
    else:
        kwargs = {**_config_kwargs(spec.config), **config_kwargs}
        model_type = kwargs.pop("model_type")
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **kwargs)
        model = auto_class.from_config(config, dtype=dtype or torch.float32, **common)
    align_with_tokenizer(model, tokenizer)
    if spec.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # the older name, deprecated since
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.config.use_cache = False
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, task_type=lora_task)
    if adapter is not None:
        model = load_lora_adapter(model, adapter, empty=building_empty())
    return model


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the quantizer flag that ``from_pretrained(..., gguf_file=)`` leaves on a model whose
    weights it has already dequantized to float, so that it saves (and exports) as an ordinary
    safetensors checkpoint; other models are returned untouched."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return model
    model.hf_quantizer = None
    model.is_quantized = False
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    return model


def align_with_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings to ``len(tokenizer)`` if needed and copy its special-token ids into the
    model config and generation config (so ``generate`` pads with PAD and stops at EOS)."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        log.info("resizing token embeddings to %d (tokenizer gained tokens)", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    for name, value in ids.items():
        setattr(model.config, name, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, value)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set the probability of every ``nn.Dropout`` in ``model`` to 0 (preference tuning and RL
    compare log-probs of two forwards; dropout would make them disagree). Float dropout rates
    kept as module attributes (Llama's ``attention_dropout``, applied functionally) go to 0 too."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
