"""Tests for prefl.generation.sample: the completion mask by hand, and ``sample_completions`` on the
tiny random toy model (ordering, seeding, RNG isolation, train/eval mode, EOS truncation).

With its tied random embeddings the toy model mostly repeats the last prompt token, with a top
logit gap of about 0.7: at temperature 0.01 sampling is greedy to within ``exp(-70)``. To make EOS
likely, a forward hook on ``lm_head`` adds ``EOS_BOOST`` to the EOS logit and removes the other
special tokens, so every generated token before EOS is a word.
"""

from __future__ import annotations

import pytest
import torch

from prefl.callbacks import EvalCallback, SampleReport
from prefl.data.prompts import as_user_turns, encode_prompt_list
from prefl.generation.sample import Samples, completion_mask, sample_completions
from prefl.models import CausalLMSpec, build_causal_lm

PAD, EOS = 0, 1
PROMPTS = [
    "happily , the movie was",
    "sadly , the film is great good bad",  # longer: the batch is left-padded
    "honestly , the plot felt",
]
EOS_BOOST = 2.5
OTHER_SPECIALS = [0, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def model(model):
    """The shared toy model (tests/conftest.py) in training mode, as built: sampling must switch
    to eval and back."""
    return model.train()


@pytest.fixture
def eos_model(tok):
    torch.manual_seed(0)
    model = build_causal_lm(CausalLMSpec(config="toy"), tok)

    def boost_eos(module, inputs, output):
        output = output.clone()
        output[..., EOS] += EOS_BOOST
        output[..., OTHER_SPECIALS] = -1e4
        return output

    model.lm_head.register_forward_hook(boost_eos)
    return model


# --------------------------------------------------------------------------- completion_mask


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([5, 6, EOS, 7, 8], [1, 1, 1, 0, 0]),  # EOS in the middle: kept, the rest masked
        ([EOS, 5, 6], [1, 0, 0]),  # EOS first
        ([5, 6, 7], [1, 1, 1]),  # no EOS
        ([5, EOS, 6, EOS, 7], [1, 1, 0, 0, 0]),  # only the first EOS counts
        ([EOS, EOS, EOS], [1, 0, 0]),
        ([5, 6, EOS], [1, 1, 1]),  # EOS last
        ([5, EOS, PAD, PAD], [1, 1, 0, 0]),
    ],
)
def test_completion_mask_hand_cases(ids, expected):
    mask = completion_mask(torch.tensor([ids]), EOS)
    assert mask.dtype == torch.long
    assert mask.tolist() == [expected]


def test_completion_mask_rows_are_independent():
    ids = torch.tensor([[5, EOS, 6], [EOS, 5, 6], [5, 6, 7]])
    assert completion_mask(ids, EOS).tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    # a different EOS id
    assert completion_mask(ids, 6).tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]


# --------------------------------------------------------------------------- sample_completions


def test_shapes_and_order(model, tok):
    out = sample_completions(model, tok, PROMPTS, max_new_tokens=5, num_samples=3, batch_size=4)
    assert isinstance(out, Samples)
    assert out.prompts == [p for p in PROMPTS for _ in range(3)]
    n = len(PROMPTS) * 3
    assert len(out.completions) == len(out.ended) == len(out.lengths) == n
    assert all(1 <= length <= 5 for length in out.lengths)


def test_conversations_are_asked_in_the_chat_template(model, tok):
    """A conversation prompt is sampled from its chat-template ids (generation prompt included)
    and reported as its rendered text; ``chat=True`` on the callbacks asks texts that way."""
    chats = as_user_turns(PROMPTS[:2])
    texts, ids = encode_prompt_list(tok, chats)
    out = sample_completions(model, tok, chats, max_new_tokens=3, batch_size=2)
    assert out.prompt_ids == ids and out.prompts == texts
    assert all(t.startswith("<bos><|user|> ") and t.endswith("<|assistant|> ") for t in texts)
    plain = sample_completions(model, tok, PROMPTS[:2], max_new_tokens=3, batch_size=2)
    assert plain.prompt_ids != ids
    for callback in (SampleReport, EvalCallback):
        assert callback(prompts=PROMPTS[:2], chat=True).prompts == chats
        assert callback(prompts=PROMPTS[:2]).prompts == PROMPTS[:2]


def test_same_seed_same_completions_different_seed_different(model, tok):
    kwargs = {"max_new_tokens": 6, "num_samples": 2, "temperature": 1.0}
    a = sample_completions(model, tok, PROMPTS, seed=11, **kwargs)
    b = sample_completions(model, tok, PROMPTS, seed=11, **kwargs)
    c = sample_completions(model, tok, PROMPTS, seed=12, **kwargs)
    assert a == b
    assert a.completions != c.completions
    # at temperature 1 the samples of one prompt differ from each other too
    assert len(set(a.completions)) > len(PROMPTS)


def test_low_temperature_is_greedy_and_seed_independent(model, tok):
    a = sample_completions(model, tok, PROMPTS, max_new_tokens=6, temperature=0.01, seed=0)
    b = sample_completions(model, tok, PROMPTS, max_new_tokens=6, temperature=0.01, seed=1)
    assert a.completions == b.completions
    # ... and equals a hand-written greedy loop on each prompt alone (no padding): left padding
    # and the attention mask do not change what a padded row generates
    model.eval()
    for prompt, completion in zip(PROMPTS, a.completions, strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        greedy = []
        with torch.no_grad():
            for _ in range(6):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                greedy.append(int(nxt))
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert EOS not in greedy
        assert completion == tok.decode(greedy)
    model.train()


def test_batch_size_does_not_change_order_or_greedy_results(model, tok):
    one = sample_completions(
        model, tok, PROMPTS, max_new_tokens=4, temperature=0.01, num_samples=2, batch_size=64
    )
    chunked = sample_completions(
        model, tok, PROMPTS, max_new_tokens=4, temperature=0.01, num_samples=2, batch_size=4
    )
    assert chunked == one


def test_global_rng_state_is_untouched(model, tok):
    torch.manual_seed(123)
    sample_completions(model, tok, PROMPTS, max_new_tokens=3, seed=7)
    after = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(5))


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(model, tok, training):
    model.train(training)
    sample_completions(model, tok, PROMPTS[:1], max_new_tokens=2)
    assert all(m.training == training for m in model.modules())
    model.train()


def test_eos_truncation_against_the_raw_generate_output(eos_model, tok, monkeypatch):
    raw = []
    generate = eos_model.generate

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        raw.append((kwargs["input_ids"].shape[1], out))
        return out

    monkeypatch.setattr(eos_model, "generate", recording_generate)
    max_new = 6
    out = sample_completions(eos_model, tok, PROMPTS, max_new_tokens=max_new, num_samples=6)
    assert len(raw) == 1
    prompt_len, sequences = raw[0]
    generated = sequences[:, prompt_len:]
    assert generated.shape[0] == 18 and generated.shape[1] <= max_new
    assert any(out.ended) and not all(out.ended)  # both cases occur
    for i, row in enumerate(generated.tolist()):
        if EOS in row:
            first = row.index(EOS)
            assert out.ended[i] is True
            assert out.lengths[i] == first + 1
            assert all(t == PAD for t in row[first + 1 :])  # generate pads finished rows
            assert out.completions[i] == tok.decode(row[:first])
        else:
            assert out.ended[i] is False
            assert out.lengths[i] == len(row) == max_new
            assert out.completions[i] == tok.decode(row)
        assert all(t >= 7 for t in row[: out.lengths[i] - out.ended[i]])  # words only


def test_ended_lengths_and_text_agree(eos_model, tok):
    max_new = 5
    out = sample_completions(
        eos_model, tok, PROMPTS, max_new_tokens=max_new, num_samples=8, batch_size=5, seed=3
    )
    assert any(out.ended) and not all(out.ended)
    for completion, ended, length in zip(out.completions, out.ended, out.lengths, strict=True):
        assert 1 <= length <= max_new
        if not ended:
            assert length == max_new
        # every token before EOS is one word: nothing after EOS reaches the text
        assert len(completion.split()) == length - int(ended)
        assert "<eos>" not in completion and "<pad>" not in completion


def test_no_eos_possible_means_nothing_ended(model, tok):
    def forbid_eos(module, inputs, output):
        output = output.clone()
        output[..., EOS] = -1e4
        return output

    handle = model.lm_head.register_forward_hook(forbid_eos)
    try:
        out = sample_completions(model, tok, PROMPTS, max_new_tokens=4, num_samples=2)
    finally:
        handle.remove()
    assert out.ended == [False] * 6
    assert out.lengths == [4] * 6


def test_always_eos_gives_empty_ended_completions(model, tok):
    def force_eos(module, inputs, output):
        output = output.clone()
        output[..., EOS] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        out = sample_completions(model, tok, PROMPTS, max_new_tokens=4)
    finally:
        handle.remove()
    assert out.completions == ["", "", ""]
    assert out.ended == [True, True, True]
    assert out.lengths == [1, 1, 1]
