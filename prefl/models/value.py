"""The value model (critic) of PPO: a backbone with a scalar head read at *every* token.

It is a one-label sequence classifier like the reward model (:func:`build_reward_model`), so it is
initialised from the reward-model export (design §5.9: the critic starts as the reward model, head
included) or, without one, from the policy's checkpoint with a fresh head. Where the reward model
pools at the last real token, the value model returns the head's output at each position.

**Parameterisation** (:func:`critic_spec`): the critic is trained the way the policy is. With a
full fine-tuned policy every critic weight trains. With a LoRA policy the critic gets LoRA
adapters of its own (the policy's :class:`~prefl.models.LoraSpec`, on its own copy of the
backbone) and a head trained in full (``peft``'s ``SEQ_CLS`` task keeps the head in
``modules_to_save``), as TRL and OpenRLHF do for value models: the critic's gradients and
optimizer state are then adapter-sized too, which is what makes a 7B PPO run fit. Its frozen
backbone is still a second copy of the weights (the critic starts from the reward model, not from
the policy).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from prefl.models.causal_lm import CausalLMSpec
from prefl.models.reward import backbone_and_head, build_reward_model


class ValueModel(torch.nn.Module):
    """Per-token values ``V(s_t)`` from a one-label sequence classifier.

    Args:
        model: A one-label ``AutoModelForSequenceClassification``, plain or LoRA-wrapped (a
            ``peft`` model of task ``SEQ_CLS``); backbone and head are found through
            :func:`~prefl.models.reward.backbone_and_head`.
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
        backbone, head = backbone_and_head(self.model)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return head(hidden).squeeze(-1).float()


def critic_spec(policy: CausalLMSpec | str, source: str | None = None) -> CausalLMSpec:
    """What the critic is built from, trained the way the policy is (see the module docstring).

    Args:
        policy: The policy's spec (a string is a name or path).
        source: A reward-model export or checkpoint to start from (its head kept); None = the
            policy's own source, with a new head.

    Returns:
        ``policy`` itself when ``source`` is None (its LoRA settings included); else a spec
        loading ``source`` with the policy's ``lora`` and ``gradient_checkpointing``.
    """
    policy = CausalLMSpec(name_or_path=policy) if isinstance(policy, str) else policy
    if source is None:
        return policy
    return CausalLMSpec(
        name_or_path=source,
        gradient_checkpointing=policy.gradient_checkpointing,
        lora=policy.lora,
    )


def build_value_model(spec: CausalLMSpec | str, tokenizer: PreTrainedTokenizerBase) -> ValueModel:
    """A :class:`ValueModel` from a reward-model export (head kept) or any causal-LM checkpoint
    or config (new head ``N(0, 1/sqrt(d+1))``); with ``spec.lora`` only the adapters and the
    head train (see :func:`critic_spec` for the spec PPO passes)."""
    return ValueModel(build_reward_model(spec, tokenizer))
