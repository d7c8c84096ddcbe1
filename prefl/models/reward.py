"""The reward model: a causal-LM backbone with a scalar head, read at the last real token.

:func:`build_reward_model` loads the backbone through ``AutoModelForSequenceClassification`` with
one label, so a causal-LM checkpoint (e.g. the SFT export) gets a fresh scalar head initialised
``N(0, 1/sqrt(d+1))``, and a reward-model checkpoint (a sequence classifier with one label) keeps
its trained head. :class:`RewardModel` wraps it: ``forward`` gives one reward per sequence, read at
the last real token whatever the padding side (position ids follow the attention mask, so left
padding does not shift positions); ``score(prompts, completions)`` is the batch API for users;
``save_pretrained`` / ``from_pretrained`` write and read a directory that
``AutoModelForSequenceClassification.from_pretrained`` also loads, plus the reward statistics
(``reward_stats.json``: mean and std on validation pairs) that PPO uses to normalise rewards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from prefl.data.boundary import encode_rows
from prefl.data.collate import pad
from prefl.data.tokenizers import gguf_source, load_tokenizer
from prefl.models.causal_lm import CausalLMSpec, build_hf_model
from prefl.models.lora import is_lora, merge_lora
from prefl.models.packed import packed_model_inputs

STATS_FILE = "reward_stats.json"


def _is_reward_checkpoint(spec: CausalLMSpec) -> bool:
    """Whether the checkpoint already is a one-label sequence classifier (a trained head)."""
    source, gguf_file = gguf_source(spec.name_or_path, spec.gguf_file)
    config = AutoConfig.from_pretrained(
        source, gguf_file=gguf_file, trust_remote_code=spec.trust_remote_code
    )
    archs = config.architectures or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == 1


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The transformer backbone and the scalar head of a Hugging Face sequence classifier, plain
    or LoRA-wrapped: the one place that looks through ``peft`` (reward and value models both).

    On a ``peft.PeftModel``, ``model.base_model`` is the LoRA tuner (its forward is the whole
    classifier), so the classifier is unwrapped first (``get_base_model``); its backbone is then
    the ``base_model_prefix`` submodule (``model`` for Llama), whose layers carry the adapters.
    With LoRA the head is peft's trained copy (``modules_to_save``) of the default adapter; the
    original head stays frozen.

    Args:
        model: A one-label ``AutoModelForSequenceClassification``, or a ``peft`` model of one.

    Returns:
        ``(backbone, head)``: the backbone returns ``last_hidden_state`` ``(B, T, d)``, the
        head maps ``d`` to one score.

    Raises:
        ValueError: If the classifier has no backbone submodule or no linear head.
    """
    base = model.get_base_model() if is_lora(model) else model
    prefix = getattr(base, "base_model_prefix", None)
    backbone = getattr(base, prefix, None) if prefix else None
    if not isinstance(backbone, torch.nn.Module):
        raise ValueError(f"{type(base).__name__} has no backbone (`base_model_prefix`) submodule")
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        saved = getattr(head, "modules_to_save", None)  # peft's trained copy (a ModuleDict)
        if saved is not None and "default" in saved:
            head = saved["default"]
        if isinstance(head, torch.nn.Linear):
            return backbone, head
    raise ValueError(f"{type(base).__name__} has no linear `score` or `classifier` head")


def reward_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The scalar head of a Hugging Face sequence classifier (``score`` or ``classifier``; with
    LoRA peft's trained copy), see :func:`backbone_and_head`."""
    return backbone_and_head(model)[1]


def build_reward_model(
    spec: CausalLMSpec | str, tokenizer: PreTrainedTokenizerBase
) -> torch.nn.Module:
    """A one-label ``AutoModelForSequenceClassification`` for ``spec``; with ``spec.lora`` a
    ``peft`` model of task ``SEQ_CLS``: adapters on the backbone, the head trained in full.

    A new head (from a causal-LM checkpoint or a random-init config) is initialised
    ``N(0, 1/sqrt(d+1))`` with ``d`` the hidden size; a reward checkpoint keeps its head.
    """
    spec = CausalLMSpec(name_or_path=spec) if isinstance(spec, str) else spec
    trained = spec.name_or_path is not None and _is_reward_checkpoint(spec)
    model = build_hf_model(
        spec, tokenizer, AutoModelForSequenceClassification, lora_task="SEQ_CLS", num_labels=1
    )
    if not trained:
        head = reward_head(model)
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
            if head.bias is not None:
                head.bias.zero_()
    return model


@contextmanager
def mask_pooled(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Iterator[torch.Tensor]:
    """``input_ids`` ``(B, T)`` such that the classifier's own pooling reads each row's last real
    token by ``attention_mask`` (1 = real).

    Hugging Face classifiers read the rightmost token whose id is not ``config.pad_token_id``.
    Where PAD is EOS (most instruct checkpoints; prefl keeps their vocabulary) that would skip a
    completion's final EOS and read the token before it. So when a real token carries the PAD id,
    the padding positions get an id that no real token of the batch has, and the config names
    that id PAD for the duration of the call (restored after). The model's own ``forward`` still
    runs (sharding hooks included); the padding positions are masked, so their id is never seen.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    config = config or model.config
    pad = config.pad_token_id
    real = input_ids[attention_mask.bool()]
    if pad is not None and not bool((real == pad).any()):
        yield input_ids
        return
    present = torch.zeros(model.get_input_embeddings().num_embeddings, dtype=torch.bool)
    present[real.cpu()] = True
    sentinel = int((~present).nonzero()[0])
    config.pad_token_id = sentinel
    try:
        yield input_ids.masked_fill(attention_mask == 0, sentinel)
    finally:
        config.pad_token_id = pad


class RewardModel(torch.nn.Module):
    """A sequence classifier with one label, used as ``r(prompt, completion)``.

    Args:
        model: The one-label ``AutoModelForSequenceClassification`` (possibly LoRA-wrapped).
        tokenizer: Its tokenizer (its PAD may be its EOS: the read-out follows the mask).
        stats: ``{"mean", "std"}`` of rewards on validation pairs, if known.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        stats: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.stats = model, tokenizer, stats

    @property
    def config(self) -> Any:
        """The wrapped model's config."""
        return self.model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        read_at: torch.Tensor | None = None,
        **layout: Any,
    ) -> torch.Tensor:
        """Rewards ``(B,)`` of ``input_ids`` ``(B, T)``, padded left or right (mask 1 = real),
        read at each row's last real token by the mask, also where PAD is EOS
        (:func:`mask_pooled`).

        With ``read_at`` (packed rows, see :meth:`packed`): ``attention_mask`` is the layout's
        mask (4D, or None), ``position_ids`` its positions, and the rewards ``(S,)`` are the
        head's outputs at the flat positions ``read_at`` ``(S,)``; ``layout`` holds what else the
        layout passes to the model (:func:`prefl.models.packed.packed_model_inputs`).
        """
        if read_at is not None:
            return self._read_at(input_ids, attention_mask, position_ids, read_at, layout)
        kwargs = {}
        if not bool(attention_mask[:, 0].all()):  # left padding: positions follow the mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # right padding (or none): the model's default positions 0..T-1 are the same for every
        # real token, and one (1, T) rotary table is cheaper than a (B, T) one
        with mask_pooled(self.model, input_ids, attention_mask) as ids:
            out = self.model(
                input_ids=ids, attention_mask=attention_mask, use_cache=False, **kwargs
            )
        return out.logits[:, 0].float()

    def _read_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        read_at: torch.Tensor,
        layout: dict[str, Any],
    ) -> torch.Tensor:
        """The head's per-position outputs at ``read_at``: the classifier's own forward runs
        (its pooling, which packed rows do not fit, is ignored)."""
        outputs: list[torch.Tensor] = []
        handle = reward_head(self.model).register_forward_hook(
            lambda module, args, out: outputs.append(out)
        )
        try:
            self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **layout,
            )
        finally:
            handle.remove()
        return outputs[0].flatten(0, 1)[read_at, 0].float()

    def packed(self, batch: dict[str, Any]) -> torch.Tensor:
        """Rewards ``(S,)`` of the sequences of a packed batch (:mod:`prefl.data.packing`), each
        read at its last token (``last_index``), through this module's ``forward`` (so that a
        sharded model's hooks run)."""
        return self(**packed_model_inputs(self.model, batch), read_at=batch["last_index"])

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32
    ) -> list[float]:
        """Rewards of (prompt, completion) texts, tokenized as the data module tokenizes plain
        rows (:func:`prefl.data.boundary.encode_rows`: BOS, the completion after its prompt in
        the joint text, ending in exactly one EOS; special-token strings stay text), in the order
        given."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            rows = encode_rows(
                self.tokenizer, list(prompts[chunk]), [[c] for c in completions[chunk]], False
            )
            p, c = rows.prompts, [ids for (ids,) in rows.completions]
            seqs = [a + b for a, b in zip(p, c, strict=True)]
            length = max(len(s) for s in seqs)
            ids = pad(seqs, self.tokenizer.pad_token_id, length).to(device)
            mask = pad([[1] * len(s) for s in seqs], 0, length).to(device)
            out += self(ids, mask).cpu().tolist()
        self.train(was_training)
        return out

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(r - mean) / std`` with the stored statistics (unchanged when there are none)."""
        if not self.stats:
            return rewards
        return (rewards - self.stats["mean"]) / max(self.stats["std"], 1e-8)

    def save_pretrained(
        self, dirpath: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write the classifier (LoRA merged, safetensors), tokenizer and reward statistics.

        Args:
            dirpath: Target directory, created if needed.
            state_dict: The classifier's full weights, for a sharded model (see
                :func:`prefl.models.sharding.full_state_dict`); None = its own.
        """
        out = Path(dirpath)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            merge_lora(self.model).save_pretrained(out, safe_serialization=True)
        else:
            self.model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        if self.stats is not None:
            (out / STATS_FILE).write_text(json.dumps(self.stats, indent=2) + "\n")
        else:
            (out / STATS_FILE).unlink(missing_ok=True)  # never leave stale statistics behind
        return out

    @classmethod
    def from_pretrained(cls, dirpath: str | Path, **spec: Any) -> RewardModel:
        """Load a directory written by :meth:`save_pretrained` (or any one-label reward
        checkpoint); ``spec`` takes extra :class:`CausalLMSpec` fields (``dtype``, ...)."""
        tokenizer = load_tokenizer(
            str(dirpath), trust_remote_code=spec.get("trust_remote_code", False)
        )
        model = build_reward_model(CausalLMSpec(name_or_path=str(dirpath), **spec), tokenizer)
        stats_path = Path(dirpath) / STATS_FILE
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        return cls(model, tokenizer, stats).eval()
