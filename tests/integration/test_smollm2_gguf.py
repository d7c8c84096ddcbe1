"""Every kind of model prefl builds reads the GGUF file itself: the policy (through the
``smollm2_dir`` fixture, which exports it), and here the reward model and the critic, whose
backbones must hold the same dequantized weights as the policy, with the vocabulary as it is, and
which must save as plain safetensors directories."""

from __future__ import annotations

import pytest
import torch
from smollm2_support import VOCAB
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from prefl.data import load_tokenizer
from prefl.models import CausalLMSpec
from prefl.models.reward import RewardModel, backbone_and_head, build_reward_model
from prefl.models.value import build_value_model

pytestmark = pytest.mark.slow


def test_reward_and_value_models_read_the_gguf_file(smollm2_gguf, smollm2_dir, tmp_path):
    """Built from the ``.gguf`` path (one read for the two, here: the critic is built from the
    same spec, as PPO builds it when no value model is named)."""
    tokenizer = load_tokenizer(str(smollm2_gguf))
    spec = CausalLMSpec(name_or_path=str(smollm2_gguf))
    classifier = build_reward_model(spec, tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    backbone, head = backbone_and_head(classifier)
    assert classifier.config.vocab_size == VOCAB and head.out_features == 1
    embeddings = backbone.get_input_embeddings().weight
    assert embeddings.shape[0] == VOCAB
    assert torch.equal(embeddings, policy.get_input_embeddings().weight)
    last = "layers.29.mlp.down_proj.weight"
    assert torch.equal(backbone.state_dict()[last], policy.model.state_dict()[last])

    rm = RewardModel(classifier, tokenizer)
    ids = torch.tensor([tokenizer("I can't help with that.")["input_ids"]])
    score = rm(ids, torch.ones_like(ids))
    assert score.shape == (1,) and torch.isfinite(score).all()
    out = rm.save_pretrained(tmp_path / "rm")
    assert (out / "model.safetensors").is_file()
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.num_labels == 1 and plain.config.vocab_size == VOCAB

    critic = build_value_model(spec, tokenizer)
    values = critic(ids, torch.ones_like(ids))
    assert values.shape == ids.shape and torch.isfinite(values).all()
