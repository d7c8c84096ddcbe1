"""PAD == EOS: a real checkpoint's vocabulary is kept, and every stage stays correct.

Most instruct checkpoints have no PAD or use their EOS as PAD. prefl then pads with the EOS id and
tells padding from a real EOS by the masks alone. These tests take the toy tokenizer with its EOS
made PAD (the toy model itself has a distinct PAD) and check each place that could confuse the
two: the tokenizer rule, the collated masks, sampling (truncation after the first EOS, the EOS
flag), the PPO rollout, and the reward read-out (a Hugging Face classifier finds "the last non-PAD
id", which is the token *before* a completion's final EOS when PAD is EOS).
"""

from __future__ import annotations

import pytest
import torch

from prefl.data import PreferenceCollator, build_toy_tokenizer, load_tokenizer
from prefl.generation import sample_completions, sample_responses
from prefl.models import CausalLMSpec, RewardModel, build_causal_lm, build_reward_model

EOS = 1


@pytest.fixture
def pad_is_eos():
    """The toy tokenizer with PAD = EOS (id 1), as an instruct checkpoint's."""
    tok = build_toy_tokenizer()
    tok.pad_token = tok.eos_token
    return load_tokenizer(tok)


def test_load_tokenizer_keeps_the_vocabulary():
    """No PAD: the EOS becomes PAD; PAD == EOS: kept. No token is ever added."""
    tok = build_toy_tokenizer()
    size = len(tok)
    tok.pad_token = tok.eos_token
    assert load_tokenizer(tok).pad_token_id == EOS and len(tok) == size
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert load_tokenizer(tok).pad_token_id == EOS and len(tok) == size
    assert load_tokenizer("toy").pad_token_id == 0  # the toy tokenizer keeps its own PAD


def test_model_built_for_a_pad_is_eos_tokenizer_keeps_its_size(pad_is_eos):
    model = build_causal_lm(CausalLMSpec(config="toy"), pad_is_eos)
    assert model.get_input_embeddings().num_embeddings == len(pad_is_eos)
    assert model.config.pad_token_id == model.config.eos_token_id == EOS


def test_collated_masks_keep_the_completions_eos(pad_is_eos):
    """Right-padded with the EOS id: the masks alone mark the real tokens, and each completion's
    own final EOS is in its loss mask."""
    collate = PreferenceCollator(pad_is_eos.pad_token_id, "sft")
    rows = [
        {"prompt_ids": [2, 7, 8], "completion_ids": [9, EOS]},
        {"prompt_ids": [2, 7], "completion_ids": [9, 10, 11, EOS]},
    ]
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[2, 7, 8, 9, EOS, EOS], [2, 7, 9, 10, 11, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]


def test_sampling_cuts_after_the_first_eos(pad_is_eos):
    """A model that emits EOS with certainty: every completion is exactly ``[EOS]`` (length 1,
    ended), although the rest of the row is padded with the same id."""
    torch.manual_seed(0)
    model = build_causal_lm(CausalLMSpec(config="toy"), pad_is_eos)
    bias = torch.full((len(pad_is_eos),), -1e4)
    bias[EOS] = 0.0
    model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    samples = sample_completions(model, pad_is_eos, ["happily , the movie was"] * 2, 5)
    assert samples.completion_ids == [[EOS], [EOS]]
    assert samples.lengths == [1, 1] and samples.ended == [True, True]
    prompt = torch.tensor([[EOS, 2, 7], [2, 7, 8]])  # left-padded with the PAD (= EOS) id
    responses = sample_responses(
        model,
        prompt,
        torch.tensor([[0, 1, 1], [1, 1, 1]]),
        k=1,
        temperature=1.0,
        max_new_tokens=4,
        pad_token_id=EOS,
        eos_token_id=EOS,
        seed=0,
    )
    assert responses.response_mask.tolist() == [[1], [1]]  # generate stops once all ended
    assert responses.ended.tolist() == [True, True]


def test_sampling_without_eos_is_not_ended(pad_is_eos):
    """A model that never emits EOS: full-length completions, none ended, no EOS in the mask."""
    torch.manual_seed(0)
    model = build_causal_lm(CausalLMSpec(config="toy"), pad_is_eos)
    bias = torch.zeros(len(pad_is_eos))
    bias[EOS] = -1e4
    model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    samples = sample_completions(model, pad_is_eos, ["happily , the movie was"], 4)
    assert samples.lengths == [4] and samples.ended == [False]
    assert EOS not in samples.completion_ids[0]


def test_reward_is_read_at_the_final_eos_when_pad_is_eos(pad_is_eos):
    """The same sequences scored (a) with a distinct PAD id and (b) padded with the EOS id, the
    config's PAD being EOS: the rewards agree exactly, both read at the last real token (the
    final EOS), not at the token before it as the classifier's id-based pooling would."""
    torch.manual_seed(0)
    distinct = load_tokenizer("toy")
    model = build_reward_model(CausalLMSpec(config="toy"), distinct)
    rm = RewardModel(model, distinct).eval()
    seqs = [[2, 7, 8, 9, EOS], [2, 7, 9, 10, 11, 12, EOS]]
    mask = torch.tensor([[1] * 5 + [0, 0], [1] * 7])
    with torch.no_grad():
        expected = rm(torch.tensor([s + [0] * (7 - len(s)) for s in seqs]), mask)
        model.config.pad_token_id = EOS
        rm.tokenizer = pad_is_eos
        got = rm(torch.tensor([s + [EOS] * (7 - len(s)) for s in seqs]), mask)
        short = [s[:-1] + [EOS] * (8 - len(s)) for s in seqs]  # the same rows without the EOS
        before_eos = rm(torch.tensor(short), torch.tensor([[1] * 4 + [0] * 3, [1] * 6 + [0]]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, before_eos, atol=1e-4)  # the EOS position matters
    assert model.config.pad_token_id == EOS  # restored after the call
