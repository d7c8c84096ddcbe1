"""prefl samples from exactly ``softmax(logits / T)``, whatever the checkpoint's generation config.

A checkpoint's ``generation_config`` (``generation_config.json``) may carry any logits processor:
repetition penalty, no-repeat n-grams, a minimum length, suppressed / banned / biased tokens,
min-p, typical, epsilon cutoffs, forced EOS, beams... If ``generate`` applied them, the PPO ratio
and the KL estimate would refer to a distribution nobody sampled from. Here the tiny toy Llama is
given a hostile generation config (in memory, and saved to disk and reloaded through
:func:`prefl.models.build_causal_lm`), and every step's sampling distribution of prefl's
generation path (``output_scores``, the processed scores ``generate`` samples from) is compared
with ``softmax(logits / T)`` of a separate teacher-forced forward and with the log-probs the PPO
loss uses (:func:`prefl.generation.rollout.response_logprobs`). The old call (sampling kwargs only)
and a
fresh ``GenerationConfig`` passed without isolation are shown to sample from something else.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig

from prefl.data.collate import pad
from prefl.generation.rollout import Responses, response_logprobs, sample_responses
from prefl.generation.sample import (
    completion_mask,
    generate_with,
    isolated_generation_config,
    sample_completions,
    sampling_config,
)
from prefl.models import CausalLMSpec, build_causal_lm

PAD, EOS = 0, 1
T = 0.7
MAX_NEW = 8
PROMPTS = ["happily , the movie was", "sadly , the film is great good bad", "honestly , it"]
#: processors a real instruct checkpoint might ship, and some more; half the words suppressed
HOSTILE = {
    "do_sample": True,
    "temperature": 0.5,
    "top_k": 5,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "no_repeat_ngram_size": 2,
    "min_new_tokens": 3,
    "suppress_tokens": list(range(7, 40)),
    "bad_words_ids": [[40], [41]],
    "begin_suppress_tokens": [42],
    "sequence_bias": [[[43], 5.0]],
    "min_p": 0.05,
    "typical_p": 0.9,
    "epsilon_cutoff": 3e-4,
    "renormalize_logits": True,
    "forced_eos_token_id": EOS,
    "exponential_decay_length_penalty": (2, 1.5),
}
#: decoding changes that would not even keep the output's shape (the old call is not run on it)
HOSTILE_DECODING = {"num_beams": 2, "num_return_sequences": 2}


@pytest.fixture(scope="module")
def clean(model):
    """The shared toy model (tests/conftest.py), its generation config as built (not hostile)."""
    return model


def hostile_copy(model: torch.nn.Module, decoding: bool = True) -> torch.nn.Module:
    out = copy.deepcopy(model)
    out.generation_config.update(**HOSTILE, **(HOSTILE_DECODING if decoding else {}))
    return out


@pytest.fixture(scope="module")
def hostile(clean):
    return hostile_copy(clean)


@pytest.fixture(scope="module")
def from_disk(clean, tok, tmp_path_factory):
    """The hostile checkpoint saved with ``save_pretrained`` and loaded back by prefl."""
    path = tmp_path_factory.mktemp("hostile")
    hostile_copy(clean).save_pretrained(path)
    assert "no_repeat_ngram_size" in (path / "generation_config.json").read_text()
    return build_causal_lm(CausalLMSpec(name_or_path=str(path)), tok).eval()


def batch(tok) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tok(PROMPTS)["input_ids"]
    length = max(len(i) for i in ids)
    mask = [[1] * len(i) for i in ids]
    return pad(ids, PAD, length, left=True), pad(mask, 0, length, left=True)


def step_distributions(model, ids, mask, out) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, R, V)`` sampling distributions of ``generate`` (softmax of its processed scores) and
    ``softmax(logits / T)`` of a teacher-forced forward on the generated sequences."""
    sampled = torch.softmax(torch.stack(out.scores, 1), -1)
    full = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1] :])], 1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=full, position_ids=positions).logits
    r = len(out.scores)
    return sampled, torch.softmax(logits[:, ids.shape[1] - 1 : ids.shape[1] - 1 + r] / T, -1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("source", ["in_memory", "from_disk"])
def test_prefl_samples_from_softmax_of_logits_over_t(source, hostile, from_disk, tok):
    model = hostile if source == "in_memory" else from_disk
    assert model.generation_config.no_repeat_ngram_size == 2  # the checkpoint does carry them
    assert model.generation_config.suppress_tokens == HOSTILE["suppress_tokens"]
    ids, mask = batch(tok)
    torch.manual_seed(0)
    out = generate_with(model, ids, mask, sampling_config(T, MAX_NEW, PAD, EOS, with_scores=True))
    assert out.sequences.shape[0] == len(PROMPTS)  # no beams, one sequence per prompt
    sampled, target = step_distributions(model, ids, mask, out)
    assert sampled.shape[1] >= 2
    torch.testing.assert_close(sampled, target, atol=1e-5, rtol=0)
    # the processed scores are the raw logits divided by T, nothing else
    torch.testing.assert_close(torch.stack(out.scores, 1), torch.stack(out.logits, 1) / T)


def test_ppo_loss_logprobs_are_those_of_the_sampler(hostile, tok):
    ids, mask = batch(tok)
    torch.manual_seed(1)
    out = generate_with(hostile, ids, mask, sampling_config(T, MAX_NEW, PAD, EOS, with_scores=True))
    response = out.sequences[:, ids.shape[1] :]
    valid = completion_mask(response, EOS)
    ended = ((response == EOS) & (valid == 1)).any(-1)
    responses = Responses(ids, mask, response.masked_fill(valid == 0, PAD), valid, ended)
    logps, _ = response_logprobs(hostile, responses, T)
    sampler = torch.log_softmax(torch.stack(out.scores, 1), -1)
    sampler = sampler.gather(-1, response[..., None])[..., 0] * valid
    torch.testing.assert_close(logps, sampler, atol=1e-5, rtol=0)


def old_call(model, ids, mask):
    """The call before the fix: sampling kwargs only, everything else from the checkpoint."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=T,
        top_k=0,
        top_p=1.0,
        max_new_tokens=MAX_NEW,
        pad_token_id=PAD,
        eos_token_id=EOS,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )


def unisolated_call(model, ids, mask):
    """prefl's own config, passed straight to ``generate`` (no :func:`isolated_generation_config`):
    transformers 5 fills its ``None`` fields from the model's generation config."""
    config = sampling_config(T, MAX_NEW, PAD, EOS, with_scores=True)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


@pytest.mark.parametrize("call", [old_call, unisolated_call])
def test_without_the_fix_the_checkpoint_config_changes_the_distribution(call, clean, tok):
    model = hostile_copy(clean, decoding=False)
    ids, mask = batch(tok)
    torch.manual_seed(0)
    out = call(model, ids, mask)
    sampled, target = step_distributions(model, ids, mask, out)
    tv = total_variation(sampled, target)
    assert tv.mean() > 0.3, tv  # about half the probability mass is moved at every step
    # the same call on the model with a clean generation config is exact
    torch.manual_seed(0)
    out = call(clean, ids, mask)
    torch.testing.assert_close(*step_distributions(clean, ids, mask, out), atol=1e-5, rtol=0)


def test_rollout_and_eval_samples_ignore_the_checkpoint_config(clean, hostile, from_disk, tok):
    ids, mask = batch(tok)
    kwargs = {"k": 3, "temperature": T, "max_new_tokens": MAX_NEW, "seed": 5}
    ref = sample_responses(clean, ids, mask, pad_token_id=PAD, eos_token_id=EOS, **kwargs)
    ref_texts = sample_completions(clean, tok, PROMPTS, MAX_NEW, temperature=T, num_samples=3)
    for model in (hostile, from_disk):
        got = sample_responses(model, ids, mask, pad_token_id=PAD, eos_token_id=EOS, **kwargs)
        assert torch.equal(got.response_ids, ref.response_ids)
        assert torch.equal(got.response_mask, ref.response_mask)
        texts = sample_completions(model, tok, PROMPTS, MAX_NEW, temperature=T, num_samples=3)
        assert texts == ref_texts
    # the words the checkpoint suppresses do occur in prefl's samples
    tokens = ref.response_ids[ref.response_mask.bool()]
    assert torch.isin(tokens, torch.tensor(HOSTILE["suppress_tokens"])).any()


def test_model_generation_config_is_restored(hostile):
    own = hostile.generation_config
    before = own.to_dict()
    with isolated_generation_config(hostile):
        assert hostile.generation_config is not own
        assert hostile.generation_config.to_dict() == GenerationConfig().to_dict()
    assert hostile.generation_config is own and own.to_dict() == before
    with pytest.raises(RuntimeError), isolated_generation_config(hostile):
        raise RuntimeError("generate failed")
    assert hostile.generation_config is own and own.to_dict() == before


def test_lora_wrapped_model_samples_from_softmax_of_logits_over_t(hostile, tok):
    pytest.importorskip("peft")
    from prefl.models.lora import LoraSpec, apply_lora

    model = apply_lora(copy.deepcopy(hostile), LoraSpec(r=2)).eval()
    own = model.get_base_model().generation_config
    ids, mask = batch(tok)
    torch.manual_seed(0)
    out = generate_with(model, ids, mask, sampling_config(T, MAX_NEW, PAD, EOS, with_scores=True))
    torch.testing.assert_close(*step_distributions(model, ids, mask, out), atol=1e-5, rtol=0)
    assert model.get_base_model().generation_config is own


def test_sampling_config_is_pure_sampling():
    config = sampling_config(0.5, 7, PAD, EOS)
    assert config.do_sample and config.temperature == 0.5 and config.max_new_tokens == 7
    assert (config.top_k, config.top_p, config.num_beams, config.repetition_penalty) == (0, 1, 1, 1)
    assert (config.pad_token_id, config.eos_token_id, config.use_cache) == (PAD, EOS, True)
    assert not config.return_dict_in_generate
    for field in ("suppress_tokens", "bad_words_ids", "min_p", "sequence_bias", "min_new_tokens"):
        assert getattr(config, field) is None
    with pytest.raises(ValueError, match="temperature"):
        sampling_config(0.0, 7, PAD, EOS)
