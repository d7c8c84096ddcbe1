"""Tests for :mod:`prefl.models.reward`: read-out, head initialisation, export, ``score``, LoRA,
and the backbone/head helper the value model (:mod:`prefl.models.value`) shares, through peft.

The toy tokenizer has PAD = 0, EOS = 1, BOS = 2 and prepends BOS when special tokens are added.
Models are tiny Llamas (the toy 2-layer, 64-wide one, or a 1-layer, 256-wide one where the head's
initial std has to be measured on enough weights), and a tiny GPT-2 for the padding checks.
Rewards are float32, so two computations of the same reward that differ only in padding or
batching agree to ``1e-5``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prefl.data.collate import pad
from prefl.models import (
    CausalLMSpec,
    LoraSpec,
    RewardModel,
    build_causal_lm,
    build_reward_model,
    is_lora,
)
from prefl.models.reward import STATS_FILE, backbone_and_head, reward_head
from prefl.models.value import ValueModel

TOL = 1e-5
#: d = 256, so a new head has 256 weights drawn N(0, 1/sqrt(257)) ≈ N(0, 0.0624): the sample std
#: then has a relative standard error of about 1/sqrt(2·256) ≈ 4.4%, and ±20% is over 4 of those.
WIDE = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}
WIDE_STD = 1.0 / math.sqrt(257)
#: Token sequences of three different lengths: BOS, prompt words, completion words, EOS.
SEQS = [
    [2, 7, 28, 55, 16, 24, 30, 34, 1],
    [2, 8, 28, 50, 17, 1],
    [2, 9, 28, 51, 16, 40, 41, 60, 33, 44, 1],
]
PROMPTS = ["happily , the movie was", "sadly , the plot is", "honestly , the cast felt"]
COMPLETIONS = ["great fun and very moving", "dull", "a bit long"]


def toy_reward_model(tok, seed: int = 0, stats=None, **spec) -> RewardModel:
    torch.manual_seed(seed)
    model = build_reward_model(CausalLMSpec(config=spec.pop("config", "toy"), **spec), tok)
    return RewardModel(model, tok, stats).eval()


def batch(seqs, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` padded with PAD (0) to the longest sequence, on the given side."""
    length = max(len(s) for s in seqs)
    ids = pad(seqs, 0, length, left=left)
    mask = pad([[1] * len(s) for s in seqs], 0, length, left=left)
    return ids, mask


@torch.no_grad()
def alone(rm: RewardModel, seqs) -> torch.Tensor:
    """Each sequence's reward run as a batch of one (no padding at all)."""
    return torch.cat([rm(*batch([s])) for s in seqs])


def head_std(model) -> float:
    return reward_head(model).weight.detach().std().item()


# --------------------------------------------------------------------------- read-out


#: GPT-2 has *absolute* position embeddings, so left padding without positions that follow the
#: mask would shift them and change the rewards (Llama's RoPE is relative, hence shift-invariant).
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}


@pytest.mark.parametrize("config", ["toy", GPT2], ids=["llama", "gpt2"])
def test_left_and_right_padding_give_the_reward_of_each_sequence_alone(tok, config):
    """The reward is read at the last real token, and positions follow the mask, so padding on
    either side changes nothing: both equal each sequence's reward run alone."""
    rm = toy_reward_model(tok, config=config)
    expected = alone(rm, SEQS)
    with torch.no_grad():
        right = rm(*batch(SEQS))
        left = rm(*batch(SEQS, left=True))
    assert right.shape == (3,)
    assert right.dtype == torch.float32
    torch.testing.assert_close(right, expected, rtol=0, atol=TOL)
    torch.testing.assert_close(left, expected, rtol=0, atol=TOL)
    assert len(set(expected.tolist())) == 3  # three different sequences, three rewards


def test_left_padding_needs_positions_from_the_mask(tok):
    """Why ``forward`` passes ``position_ids``: the bare GPT-2 classifier on a left-padded batch
    (default positions ``0..T-1``, shifted for the short rows) scores differently, while
    ``RewardModel`` matches the unpadded rewards (previous test)."""
    rm = toy_reward_model(tok, config=GPT2)
    ids, mask = batch(SEQS, left=True)
    with torch.no_grad():
        bare = rm.model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (bare - alone(rm, SEQS)).abs().max().item() > 1e-3


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_positions_are_passed_only_for_left_padding(tok, left):
    """Right padding keeps the model's default positions (one ``(1, T)`` rotary table, the
    cheaper path) and scores exactly as explicit mask-following positions do; left padding
    passes them."""
    rm = toy_reward_model(tok)
    ids, mask = batch(SEQS, left=left)
    seen = []
    hook = rm.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True
    )
    with torch.no_grad():
        got = rm(ids, mask)
        hook.remove()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        explicit = rm.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert (seen[0] is not None) == left
    torch.testing.assert_close(got, explicit.logits[:, 0].float(), rtol=0, atol=0)


def test_reward_depends_on_the_last_real_token(tok):
    """Changing only the final real token of the shortest sequence changes its reward (the
    read-out is not at a pad position), and leaves the others' rewards untouched."""
    rm = toy_reward_model(tok)
    changed = [list(s) for s in SEQS]
    changed[1][-1] = 30  # EOS -> "great"
    with torch.no_grad():
        before, after = rm(*batch(SEQS)), rm(*batch(changed))
    assert abs(after[1].item() - before[1].item()) > 1e-4
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=0, atol=TOL)


# --------------------------------------------------------------------------- head initialisation


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4)], ids=["full", "lora"])
def test_new_head_is_normal_with_std_one_over_sqrt_d_plus_one(tok, lora):
    """``d = 256``: the new head's weights have std ``1/sqrt(257) ≈ 0.0624`` (±20%; the library's
    own init would give 0.02), mean ``0`` (±3 standard errors ``3·0.0624/16 ≈ 0.0117``), no bias.
    With LoRA the trained copy of the head (peft's ``modules_to_save``) is the one initialised."""
    torch.manual_seed(0)
    model = build_reward_model(CausalLMSpec(config=WIDE, lora=lora), tok)
    head = reward_head(model)
    assert head.in_features == 256
    assert head.out_features == 1
    assert head_std(model) == pytest.approx(WIDE_STD, rel=0.2)
    assert abs(head.weight.mean().item()) < 3 * WIDE_STD / 16
    assert head.bias is None or torch.equal(head.bias, torch.zeros_like(head.bias))


def test_causal_lm_checkpoint_gets_a_new_head(tok, tmp_path):
    """From a causal-LM directory the backbone is loaded as saved and the head is new: initialised
    ``N(0, 1/sqrt(257))`` (std ±20%), and different for a different seed."""
    torch.manual_seed(0)
    lm = build_causal_lm(CausalLMSpec(config=WIDE), tok)
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(1)
    first = build_reward_model(str(tmp_path), tok)
    torch.manual_seed(2)
    second = build_reward_model(str(tmp_path), tok)
    assert head_std(first) == pytest.approx(WIDE_STD, rel=0.2)
    assert not torch.equal(reward_head(first).weight, reward_head(second).weight)
    backbone = first.model.state_dict()
    for key, value in lm.model.state_dict().items():
        assert torch.equal(backbone[key], value), key


def test_reward_checkpoint_keeps_its_trained_head_exactly(tok, tmp_path):
    """A one-label sequence classifier written by ``RewardModel.save_pretrained`` is loaded with
    its head unchanged (bit for bit), whatever the seed: no re-initialisation."""
    rm = toy_reward_model(tok, config=WIDE)
    trained = torch.linspace(-1.0, 1.0, 256).reshape(1, 256)  # std 0.58: no init looks like it
    with torch.no_grad():
        reward_head(rm.model).weight.copy_(trained)
    rm.save_pretrained(tmp_path)
    for seed in (1, 2):
        torch.manual_seed(seed)
        loaded = build_reward_model(str(tmp_path), tok)
        assert torch.equal(reward_head(loaded).weight, trained)
        for key, value in rm.model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


# --------------------------------------------------------------------------- export and stats


def test_save_pretrained_round_trips_rewards_and_stats(tok, tmp_path):
    """``AutoModelForSequenceClassification.from_pretrained`` (logits ``(B, 1)``, read at the last
    non-PAD token; right padding, so its default positions ``0..T-1`` match) and
    ``RewardModel.from_pretrained`` give the original rewards; ``reward_stats.json`` holds the
    stats and comes back as ``.stats``. The loaded wrapper is in eval mode, wrapper and model
    alike, so ``score`` (which restores the wrapper's mode) leaves dropout off."""
    stats = {"mean": 0.25, "std": 1.5, "count": 10}
    rm = toy_reward_model(tok, stats=stats)
    ids, mask = batch(SEQS)
    with torch.no_grad():
        expected = rm(ids, mask)
    out = rm.save_pretrained(tmp_path / "rm")
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / STATS_FILE).read_text()) == stats

    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, 1)
    torch.testing.assert_close(logits[:, 0], expected, rtol=0, atol=TOL)

    loaded = RewardModel.from_pretrained(out)
    assert loaded.stats == stats
    assert not loaded.training and not loaded.model.training  # a scorer: eval mode throughout
    loaded.score(PROMPTS, COMPLETIONS)
    assert not loaded.model.training  # score() restores eval, not train
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), expected, rtol=0, atol=TOL)
        torch.testing.assert_close(loaded(*batch(SEQS, left=True)), expected, rtol=0, atol=TOL)


def test_no_stats_writes_no_stats_file(tok, tmp_path):
    rm = toy_reward_model(tok)
    out = rm.save_pretrained(tmp_path)
    assert not (out / STATS_FILE).exists()
    assert RewardModel.from_pretrained(out).stats is None


def test_normalize_uses_the_stats():
    """mean 0.5, std 2: ``(2.5, -1.5, 0.5) → ((2.5-0.5)/2, (-1.5-0.5)/2, 0) = (1, -1, 0)``;
    without stats the rewards are returned unchanged."""
    rewards = torch.tensor([2.5, -1.5, 0.5])
    with_stats = RewardModel(torch.nn.Linear(1, 1), None, {"mean": 0.5, "std": 2.0})
    assert with_stats.normalize(rewards).tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-7)
    without = RewardModel(torch.nn.Linear(1, 1), None)
    assert torch.equal(without.normalize(rewards), rewards)


# --------------------------------------------------------------------------- score


def hand_ids(tok, prompt: str, completion: str) -> list[int]:
    """BOS + prompt words + completion words + EOS, as the data module tokenizes a pair."""
    words = tok(prompt, add_special_tokens=False)["input_ids"]
    answer = tok(completion, add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id, *words, *answer, tok.eos_token_id]


def test_score_equals_forward_on_hand_built_ids_in_order(tok):
    """``score`` is ``forward`` on BOS + prompt + completion + EOS, one value per pair, in the
    order given; batch sizes 1, 2, 3 (padding or not) give the same values; the training flag is
    restored afterwards."""
    rm = toy_reward_model(tok)
    seqs = [hand_ids(tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert len({len(s) for s in seqs}) == 3  # different lengths, so batches are padded
    assert seqs[0][:6] == tok(PROMPTS[0])["input_ids"]  # the tokenizer's own BOS
    expected = alone(rm, seqs).tolist()
    rm.train()
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert rm.training
    assert isinstance(scores, list) and len(scores) == 3
    assert scores == pytest.approx(expected, abs=TOL)
    for batch_size in (1, 2, 3):
        assert rm.score(PROMPTS, COMPLETIONS, batch_size=batch_size) == pytest.approx(
            expected, abs=TOL
        )
    reversed_scores = rm.score(PROMPTS[::-1], COMPLETIONS[::-1], batch_size=2)
    assert reversed_scores == pytest.approx(expected[::-1], abs=TOL)


def test_score_tokenizes_as_the_data_module_does(tok):
    """``score`` reads the sequence training reads: BOS + prompt, the completion after it in the
    joint text, one EOS. A completion that *writes* the EOS string keeps it as text (``<unk>`` in
    the toy vocabulary), so it scores like that exact sequence, not like the plain one."""
    from prefl.data.boundary import encode_rows

    rm = toy_reward_model(tok)
    written = COMPLETIONS[0] + " <eos>"
    rows = encode_rows(tok, PROMPTS[:1], [[written]], chat=False)
    ids = rows.prompts[0] + rows.completions[0][0]
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id in ids
    expected = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
    assert rm.score(PROMPTS[:1], [written]) == pytest.approx([expected], abs=TOL)


# --------------------------------------------------------------------------- LoRA


def test_lora_trains_head_and_adapters_only_and_exports_merged(tok, tmp_path):
    """With LoRA the scalar head (peft's trained copy) and the adapters train, every base weight
    is frozen. ``RewardModel.save_pretrained`` merges: after making the adapters and the head
    non-trivial (LoRA B starts at zero), the exported plain classifier gives the LoRA model's
    rewards, and the LoRA model itself is untouched by the export."""
    torch.manual_seed(0)
    model = build_reward_model(CausalLMSpec(config="toy", lora=LoraSpec(r=4)), tok)
    assert is_lora(model)
    head = reward_head(model)
    assert head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    for name, param in model.named_parameters():
        is_adapter_or_head = "lora_" in name or "modules_to_save" in name
        assert param.requires_grad == is_adapter_or_head, name
    assert id(head.weight) in {id(p) for p in model.parameters() if p.requires_grad}

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
        head.weight.add_(torch.randn_like(head.weight))
    rm = RewardModel(model, tok).eval()
    ids, mask = batch(SEQS)
    with torch.no_grad():
        expected = rm(ids, mask)
    rm.save_pretrained(tmp_path)
    assert is_lora(rm.model)  # merged on a copy
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), expected, rtol=0, atol=0)

    loaded = RewardModel.from_pretrained(tmp_path)
    assert not is_lora(loaded.model)
    assert not any("lora" in k for k in loaded.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), expected, rtol=0, atol=TOL)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(hf(input_ids=ids).logits[:, 0], expected, rtol=0, atol=TOL)
    # the perturbation mattered: the base model alone scores differently
    base = RewardModel(model.get_base_model(), tok).eval()
    with model.disable_adapter(), torch.no_grad():
        assert (base(ids, mask) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4)], ids=["full", "lora"])
def test_backbone_and_head_are_found_through_peft(tok, lora):
    """``backbone_and_head`` gives the transformer backbone (not peft's LoRA tuner, whose output
    has no ``last_hidden_state``) and the trained head, plain or LoRA-wrapped. Read at the last
    real token, the value model's per-token values are the reward model's rewards, adapters and
    head made non-trivial, with right padding (default positions) and left padding (positions
    from the mask): both paths see the same backbone, adapters included."""
    torch.manual_seed(0)
    model = build_reward_model(CausalLMSpec(config="toy", lora=lora), tok)
    backbone, head = backbone_and_head(model)
    assert type(backbone).__name__ == "LlamaModel"
    assert head is reward_head(model) and head.weight.requires_grad
    assert any("lora_" in n for n, _ in backbone.named_parameters()) == (lora is not None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
        head.weight.add_(torch.randn_like(head.weight))
    rm, value = RewardModel(model, tok).eval(), ValueModel(model).eval()
    for left in (False, True):
        ids, mask = batch(SEQS, left=left)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if left else None
        with torch.no_grad():
            values = value(ids, mask, positions)
            rewards = rm(ids, mask)
        assert values.shape == ids.shape and values.dtype == torch.float32
        last = ids.shape[1] - 1 if left else mask.sum(-1) - 1
        at_last = values[torch.arange(len(SEQS)), last]
        torch.testing.assert_close(at_last, rewards, rtol=0, atol=TOL)
    if lora is not None:  # the adapters mattered: without them the values differ
        with model.disable_adapter(), torch.no_grad():
            assert (RewardModel(model, tok).eval()(*batch(SEQS)) - rewards).abs().max() > 1e-3


def test_backbone_and_head_name_what_is_missing():
    with pytest.raises(ValueError, match="backbone"):
        backbone_and_head(torch.nn.Linear(2, 1))
