"""Tests for prefl.models.causal_lm and prefl.models.lora on the toy tokenizer and tiny models.

The toy model is a 2-layer, 64-wide Llama with ``vocab_size = len(toy tokenizer) = 70``. LoRA with
``r=4`` on "all-linear" adapts 7 linear layers per block (q, k, v, o: 64->64; gate, up: 64->256;
down: 256->64), so the trainable count is
``2 * (4 * (4*64 + 64*4) + 2 * (4*64 + 256*4) + (4*256 + 64*4)) = 2 * 5888 = 11776``.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefl.data import load_tokenizer
from prefl.models import (
    TOY_MODEL_CONFIG,
    CausalLMSpec,
    LoraSpec,
    align_with_tokenizer,
    build_causal_lm,
    disable_dropout,
    is_lora,
    merge_lora,
)
from prefl.models import causal_lm as causal_lm_module

IDS = torch.tensor([[2, 7, 28, 55, 16, 24, 30, 40], [2, 10, 28, 55, 17, 25, 41, 52]])
SMALL_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def toy_model(tok, seed: int = 0, **spec):
    torch.manual_seed(seed)
    return build_causal_lm(CausalLMSpec(config="toy", **spec), tok)


def no_pad_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- the spec


def test_spec_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        CausalLMSpec()
    with pytest.raises(ValueError, match="exactly one"):
        CausalLMSpec(name_or_path="some/model", config="toy")
    CausalLMSpec(name_or_path="some/model")
    CausalLMSpec(config="toy")


@pytest.mark.parametrize("dtype", ["float64", "bf16", "int8"])
def test_spec_rejects_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        CausalLMSpec(config="toy", dtype=dtype)


@pytest.mark.parametrize("dtype", [None, "auto", "float32", "bfloat16", "float16"])
def test_spec_accepts_good_dtype(dtype):
    assert CausalLMSpec(config="toy", dtype=dtype).dtype == dtype


@pytest.mark.parametrize("config", ["llama", {"hidden_size": 32}])
def test_config_must_be_toy_or_have_model_type(tok, config):
    with pytest.raises(ValueError, match="model_type"):
        build_causal_lm(CausalLMSpec(config=config), tok)


def test_spec_defaults():
    spec = CausalLMSpec(config="toy")
    assert spec.trust_remote_code is False
    assert spec.gradient_checkpointing is False
    assert spec.lora is None and spec.dtype is None and spec.attn_implementation is None


# --------------------------------------------------------------------------- building


def test_build_toy(tok):
    model = toy_model(tok)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, 70)
    assert model.get_input_embeddings().num_embeddings == 70
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 2)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.eos_token_id, gen.bos_token_id) == (0, 1, 2)
    assert model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert logits(model).shape == (2, 8, 70)
    # the toy dict is copied, never mutated
    assert TOY_MODEL_CONFIG["hidden_size"] == 64 and "vocab_size" not in TOY_MODEL_CONFIG


def test_build_from_an_explicit_dict(tok):
    torch.manual_seed(0)
    model = build_causal_lm(CausalLMSpec(config=dict(SMALL_LLAMA)), tok)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    assert model.config.vocab_size == len(tok) == 70
    assert (model.config.pad_token_id, model.config.eos_token_id) == (0, 1)
    assert model.generation_config.bos_token_id == 2


def test_build_with_a_tokenizer_without_pad_keeps_its_vocabulary():
    tok = load_tokenizer(no_pad_tokenizer())  # PAD becomes the EOS; no token added
    model = build_causal_lm(CausalLMSpec(config=dict(SMALL_LLAMA)), tok)
    assert model.config.vocab_size == 4
    assert (model.config.pad_token_id, model.config.eos_token_id) == (1, 1)
    assert model.config.bos_token_id is None


def test_align_with_tokenizer_grows_embeddings_for_a_token_the_user_added():
    """prefl adds no token itself; a tokenizer the user extended still gets its embeddings."""
    raw = no_pad_tokenizer()
    torch.manual_seed(0)
    model = build_causal_lm(CausalLMSpec(config=dict(SMALL_LLAMA)), raw)
    assert model.get_input_embeddings().num_embeddings == 4
    assert model.config.pad_token_id is None
    before = model.get_input_embeddings().weight.detach().clone()
    tok = load_tokenizer(raw)
    tok.add_special_tokens({"pad_token": "<|pad|>"})  # the user's own PAD = 4
    align_with_tokenizer(model, tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape == (5, 32)
    assert torch.equal(emb[:4].detach(), before)  # old rows kept
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 4
    assert model.config.eos_token_id == 1
    assert logits(model, torch.tensor([[2, 3, 4]])).shape == (1, 3, 5)
    # a second call changes nothing; a larger model is never shrunk
    align_with_tokenizer(model, tok)
    assert model.get_input_embeddings().num_embeddings == 5
    align_with_tokenizer(model, raw)
    assert model.get_input_embeddings().num_embeddings == 5


def test_bfloat16(tok):
    model = toy_model(tok, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert logits(model).dtype == torch.bfloat16


def test_attn_implementation_is_applied(tok):
    model = toy_model(tok, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    sdpa = toy_model(tok, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model), logits(sdpa), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- save / load


@pytest.fixture
def saved(tok, tmp_path):
    model = toy_model(tok, seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return model, tmp_path


def test_save_and_load_by_path_gives_identical_logits(saved):
    model, path = saved
    tok = load_tokenizer(str(path))
    expected = logits(model)
    for spec in (CausalLMSpec(name_or_path=str(path)), str(path)):
        loaded = build_causal_lm(spec, tok)
        assert loaded.training  # train mode, like a model built from a config
        assert loaded.config.vocab_size == 70 and loaded.config.pad_token_id == 0
        torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)


def test_load_by_path_with_dtype(saved, tok):
    _, path = saved
    loaded = build_causal_lm(CausalLMSpec(name_or_path=str(path), dtype="bfloat16"), tok)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_load_by_path_keeps_the_vocabulary_of_a_tokenizer_without_pad(tmp_path):
    raw = no_pad_tokenizer()
    torch.manual_seed(0)
    model = build_causal_lm(CausalLMSpec(config=dict(SMALL_LLAMA)), raw)
    model.save_pretrained(tmp_path)
    loaded = build_causal_lm(str(tmp_path), load_tokenizer(raw))
    assert loaded.get_input_embeddings().num_embeddings == 4
    assert loaded.config.pad_token_id == loaded.config.eos_token_id == 1
    ids = torch.tensor([[2, 3, 1]])
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)


def test_from_pretrained_kwargs_are_passed_through(tok, monkeypatch):
    calls = []
    made = toy_model(tok)

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return made

    auto = causal_lm_module.AutoModelForCausalLM
    monkeypatch.setattr(auto, "from_pretrained", fake_from_pretrained)
    build_causal_lm("some/model", tok)
    build_causal_lm(
        CausalLMSpec(
            name_or_path="some/model",
            trust_remote_code=True,
            dtype="bfloat16",
            attn_implementation="eager",
        ),
        tok,
    )
    assert calls[0] == ("some/model", {"dtype": None, "trust_remote_code": False})
    assert calls[1] == (
        "some/model",
        {"dtype": torch.bfloat16, "trust_remote_code": True, "attn_implementation": "eager"},
    )


def test_from_config_kwargs_are_passed_through(tok, monkeypatch):
    calls = []
    real = causal_lm_module.AutoModelForCausalLM.from_config

    def spy(config, **kwargs):
        calls.append(kwargs)
        return real(config, **kwargs)

    monkeypatch.setattr(causal_lm_module.AutoModelForCausalLM, "from_config", spy)
    toy_model(tok)
    toy_model(tok, trust_remote_code=True)
    assert calls == [
        {"dtype": torch.float32, "trust_remote_code": False},
        {"dtype": torch.float32, "trust_remote_code": True},
    ]


# --------------------------------------------------------------------------- gradient checkpointing


def loss_and_grads(model):
    model.train()
    model.zero_grad()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_loss_and_grads(tok):
    plain = toy_model(tok, seed=2)
    ckpt = toy_model(tok, seed=2, gradient_checkpointing=True)
    assert not plain.is_activation_checkpointing
    assert ckpt.is_activation_checkpointing
    assert plain.config.use_cache is True and ckpt.config.use_cache is False
    loss_a, grads_a = loss_and_grads(plain)
    loss_b, grads_b = loss_and_grads(ckpt)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- LoRA


@pytest.fixture
def lora_model(tok):
    model = toy_model(tok, seed=3, lora=LoraSpec(r=4))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)  # peft starts B at 0: make the adapters non-trivial
    return model


def test_lora_only_adapters_train(lora_model):
    assert is_lora(lora_model)
    trainable = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in lora_model.parameters() if p.requires_grad) == 11776
    frozen = [n for n, p in lora_model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen)


def test_lora_spec_fields_reach_peft(tok):
    spec = LoraSpec(r=2, alpha=8, dropout=0.25, target_modules=["q_proj", "v_proj"])
    model = toy_model(tok, lora=spec)
    adapted = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert set(adapted) == {"q_proj", "v_proj"}
    q = adapted["q_proj"]
    assert q.r["default"] == 2
    assert q.scaling["default"] == pytest.approx(4.0, abs=1e-12)  # alpha / r
    assert q.lora_dropout["default"].p == 0.25
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 2 * 2


def test_merge_lora_matches_the_adapted_model(lora_model):
    adapted = logits(lora_model)
    with lora_model.disable_adapter():
        base = logits(lora_model)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do something
    merged = merge_lora(lora_model)
    assert not is_lora(merged)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=0)
    # the original keeps its adapters and outputs (the merge happened on a copy)
    assert is_lora(lora_model)
    assert any("lora_B" in n for n, _ in lora_model.named_parameters())
    torch.testing.assert_close(logits(lora_model), adapted, atol=0, rtol=0)


def test_merge_lora_on_a_plain_model_is_identity(tok):
    model = toy_model(tok)
    assert not is_lora(model)
    assert merge_lora(model) is model


# --------------------------------------------------------------------------- dropout


def two_train_forwards(model):
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits, model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "config",
    [
        {**TOY_MODEL_CONFIG, "attention_dropout": 0.5},  # Llama: a float, applied functionally
        {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32},
    ],
    ids=["llama-attention-dropout", "gpt2-nn-dropout"],
)
def test_disable_dropout(tok, config):
    torch.manual_seed(5)
    model = build_causal_lm(CausalLMSpec(config=config), tok)
    a, b = two_train_forwards(model)
    assert (a - b).abs().max() > 1e-3  # dropout is active
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    a, b = two_train_forwards(model)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert model.training  # the mode is untouched


def test_disable_dropout_reaches_lora_dropout(tok):
    model = toy_model(tok, lora=LoraSpec(r=4, dropout=0.3))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 14 and {m.p for m in drops} == {0.3}
    disable_dropout(model)
    assert {m.p for m in drops} == {0.0}
