"""The value model (critic) of PPO: a backbone with a scalar head read at *every* token.

It is a one-label sequence classifier like the reward model (:func:`build_reward_model`), so it is
initialised from the reward-model export (design §5.9: the critic starts as the reward model, head
included) or, without one, from the policy's checkpoint with a fresh head. Where the reward model
pools at the last real token, the value model returns the head's output at each position.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from prefl.models.causal_lm import CausalLMSpec
from prefl.models.reward import build_reward_model, reward_head


class ValueModel(torch.nn.Module):
    """Per-token values ``V(s_t)`` from a one-label sequence classifier.

    Args:
        model: A one-label ``AutoModelForSequenceClassification`` (not LoRA-wrapped).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Values ``(B, T)`` (float32) at every position of ``input_ids`` ``(B, T)``."""
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return reward_head(self.model)(hidden).squeeze(-1).float()


def build_value_model(spec: CausalLMSpec | str, tokenizer: PreTrainedTokenizerBase) -> ValueModel:
    """A :class:`ValueModel` from a reward-model export (head kept) or any causal-LM checkpoint
    or config (new head ``N(0, 1/sqrt(d+1))``)."""
    return ValueModel(build_reward_model(spec, tokenizer))
