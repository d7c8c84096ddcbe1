"""LoRA wiring through ``peft`` (optional extra: ``pip install prefl[peft]``).

prefl never re-implements adapters: :func:`apply_lora` hands a typed :class:`LoraSpec` to
``peft.get_peft_model``, and :func:`merge_lora` folds the adapters back for export, so the next
stage can load a plain Hugging Face checkpoint by path. An adapter that ``peft`` saved
(``save_pretrained``: ``adapter_config.json`` beside the weights) is a checkpoint source too
(:func:`is_adapter_dir`, :func:`adapter_base`, :func:`load_lora_adapter`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: The file that marks a directory as a saved ``peft`` adapter.
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSpec:
    """LoRA adapter settings (the fields of ``peft.LoraConfig`` that matter most).

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (``lora_alpha``); the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``"all-linear"`` for every linear layer but
            the output head.
        modules_to_save: Extra modules trained in full and saved with the adapters (e.g. a
            reward head).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = field(default=None)


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs the peft extra: pip install 'prefl[peft]'") from err
    return peft


def apply_lora(
    model: torch.nn.Module, spec: LoraSpec, task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapters (and ``modules_to_save``) train.

    Args:
        model: A Hugging Face causal LM.
        spec: The adapter settings.
        task_type: ``peft.TaskType`` name: ``CAUSAL_LM``, or ``SEQ_CLS`` for a reward model
            (whose scalar head ``peft`` then trains in full and saves with the adapters).

    Returns:
        The ``peft.PeftModel`` wrapping ``model``.
    """
    peft = _peft()
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save,
        task_type=getattr(peft.TaskType, task_type),
    )
    return peft.get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (without importing peft when it is absent); FSDP2's
    ``fully_shard`` swaps in a subclass, so the whole class hierarchy is looked at."""
    return any(cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def merge_lora(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Return a plain model with the adapters merged in, for export; other models unchanged.

    Args:
        model: A model, LoRA-wrapped or not.
        inplace: Merge into ``model`` itself (no copy of the weights: for sampling, where the
            adapters are not trained any more). By default the merge happens on a copy, so
            training can continue with the adapters afterwards.
    """
    if not is_lora(model):
        return model
    if inplace:
        return model.merge_and_unload()
    import copy

    return copy.deepcopy(model).merge_and_unload()


def is_adapter_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory holding a saved ``peft`` adapter (its config file)."""
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model (hub id or path) that the adapter in ``path`` was trained on, as its
    ``adapter_config.json`` records it (``base_model_name_or_path``).

    Raises:
        ValueError: The config names no base model.
    """
    config_path = Path(path) / ADAPTER_CONFIG
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{config_path}: no base_model_name_or_path; name the base model with "
            "CausalLMSpec(name_or_path=BASE, lora_adapter=ADAPTER_DIR)"
        )
    return str(base)


def load_lora_adapter(model: torch.nn.Module, path: str | Path, empty: bool = False):
    """Wrap ``model`` with the adapter saved in ``path`` (trainable, so training can go on).

    Args:
        model: The base model the adapter was trained on.
        path: A directory written by ``peft``'s ``save_pretrained``.
        empty: The adapter's architecture only, no weights read (a rank that receives its
            weights by broadcast, see :mod:`prefl.models.sharding`).

    Returns:
        The ``peft.PeftModel``.
    """
    peft = _peft()
    if empty:
        return peft.get_peft_model(model, peft.PeftConfig.from_pretrained(str(path)))
    return peft.PeftModel.from_pretrained(model, str(path), is_trainable=True)
