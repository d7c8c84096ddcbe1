"""A Bradley-Terry reward model from the real SmolLM2-135M-Instruct on real HH pairs.

Training must raise the held-out pair accuracy above chance and lower the training loss; the
export must load with plain ``AutoModelForSequenceClassification`` (and with prefl's
``RewardModel``, with its reward statistics) and score as prefl scores. The run itself is the
session fixture ``reward_run`` (conftest.py), whose export PPO's test also scores against.
"""

from __future__ import annotations

import json

import pytest
import torch
from smollm2_support import RewardRun, assert_vocabulary_kept
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prefl import RewardModel

pytestmark = pytest.mark.slow


def test_reward_model_beats_chance_on_held_out_pairs(reward_run: RewardRun):
    """Held-out pair accuracy on the 192 held-out pairs after one epoch over the 64 training
    pairs (8 steps of 8, bf16-mixed, head lr 2e-3, backbone 2e-5).

    Measured (2-core CPU, seed 0; 189 held-out pairs parse): 0.593 after (0.603 in a run that
    only validated once more before fitting; 0.524 before, with the fresh random head); the
    loss on the training pairs 0.718 before, 0.595 after.

    Bounds: accuracy > 0.55. Chance has standard deviation 0.036 over 189 pairs, so 0.55 is 1.4
    sigma above it; the measured value clears it by 0.043, four times the 0.01 swing seen
    between runs here, room for the bf16 rounding of another CPU or library version, while a
    reward read at the wrong token or a flipped sign (at or below 0.5) fails. The training
    pairs' loss must fall by 0.05 or more (measured: 0.12).
    """
    run = reward_run
    print(
        f"reward held-out accuracy {run.accuracy:.3f}; "
        f"training-pairs loss {run.train_loss_before:.3f} -> {run.train_loss_after:.3f}"
    )
    assert run.held_out.stats["validation"]["truncated"] == 0
    assert run.accuracy > 0.55
    assert run.train_loss_after < run.train_loss_before - 0.05


def test_reward_export_loads_and_scores_like_prefl(reward_run: RewardRun):
    """The export loads with plain ``AutoModelForSequenceClassification`` (one label, the
    vocabulary unchanged) and with ``prefl.RewardModel`` (with finite reward statistics), and
    both give one reply the same score.

    The export's ``pad_token_id`` is SmolLM2's EOS (``<|im_end|>``), and transformers' classifier
    reads the rightmost token that is not PAD: on a reply ending in ``<|im_end|>`` it would read
    the token before it, where prefl reads the last real token by the attention mask. With
    ``pad_token_id = None`` and one unpadded sequence it reads the last token, as prefl does.
    """
    export = reward_run.export
    stats = json.loads((export / "reward_stats.json").read_text())
    assert stats["count"] > 0 and stats["std"] > 0
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert plain.config.num_labels == 1
    assert_vocabulary_kept(plain)
    tokenizer = AutoTokenizer.from_pretrained(export)
    messages = [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "I can't help with that."},
    ]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    if ids[0, -1] != tokenizer.eos_token_id:  # the template's newline after the last EOS
        ids = ids[:, : int((ids[0] == tokenizer.eos_token_id).nonzero()[-1]) + 1]
    rm = RewardModel.from_pretrained(export)
    with torch.no_grad():
        prefl_score = float(rm(ids, torch.ones_like(ids))[0])
        plain.config.pad_token_id = None
        hf_score = float(plain(input_ids=ids).logits[0, 0])
    print(f"reward of a refusal: prefl {prefl_score:+.4f}, transformers {hf_score:+.4f}")
    assert torch.isfinite(torch.tensor(prefl_score))
    assert abs(prefl_score - hf_score) < 1e-4
