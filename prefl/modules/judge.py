"""JudgeModule: a chat model that says which of two answers is better, in a predict loop.

``predict`` on ``prompts`` batches (each prompt one judge request, rendered by the judge's chat
template with its generation prompt and left-padded, see :mod:`prefl.data.judging`) returns
``p_first``: the probability of the first label between the two labels as the judge's next
token (``softmax`` over the two labels' logits alone, in float32). Nothing is sampled, so a
verdict is deterministic and costs one forward; Lightning's predict loop makes it data-parallel
(``prefl pairs --judge PATH --devices N``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from prefl.data.judging import JUDGE_LABELS
from prefl.models import CausalLMSpec, disable_dropout
from prefl.modules.base import CausalLMModule


def label_ids(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> list[int]:
    """The first token id of each label as the start of a reply; the ids must differ."""
    ids = []
    for label in labels:
        tokens = tokenizer.encode(label, add_special_tokens=False)
        if not tokens:
            raise ValueError(f"judge label {label!r} tokenizes to nothing")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"judge labels {list(labels)} start with the same token {ids}")
    return ids


class JudgeModule(CausalLMModule):
    """A pairwise judge: ``predict_step`` gives ``p_first`` per judge request.

    Args:
        model: The judge: a :class:`~prefl.models.CausalLMSpec` or a hub id / local path
            (a directory or a ``.gguf`` file) of a chat model.
        tokenizer: The judge's tokenizer; None = the data module's.
        labels: The first-answer and second-answer labels the judge's instructions ask for.
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        labels: tuple[str, str] = JUDGE_LABELS,
    ) -> None:
        super().__init__(model, tokenizer)
        if len(labels) != 2:
            raise ValueError(f"judge labels: expected two, got {list(labels)}")
        self.labels = tuple(labels)
        self._label_ids: list[int] | None = None

    def build_models(self) -> None:
        """Build the judge (dropout off, eval mode) and find its label ids."""
        super().build_models()
        disable_dropout(self.model)
        self.model.eval()
        self._label_ids = label_ids(self.resolve_tokenizer(), self.labels)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``p_first`` ``(B,)`` of left-padded requests ``(B, T)`` (mask 1 = real token)."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=1,
        )
        two = out.logits[:, -1, self._label_ids].float()
        return two.softmax(-1)[:, 0]

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, list]:
        """``{"p_first": [...]}`` for a ``prompts`` batch of judge requests."""
        p = self(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        return {"p_first": p.tolist()}
