"""How a packed batch reaches the model (prefl.models.packed): sdpa models attend unit by unit
through prefl's registered implementation, which is plain sdpa for every other call; models with
a sliding window take the dense mask."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from prefl.data.collate import PreferenceCollator
from prefl.functional.selected import indexed_logits
from prefl.models.packed import LAYOUT_KEY, SEGMENTS, packed_model_inputs

PROMPTS = [[1, 5, 6, 7], [1, 8]]
CHOSEN = [[9, 10, 2], [11, 2]]
REJECTED = [[12, 2], [13, 14, 15, 2]]


def tiny(cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
        **extra,
    )
    return cls(config).eval()


def shared_batch(packing: bool = True) -> dict:
    examples = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)
    ]
    return PreferenceCollator(0, "pairs", packing=packing, share_prompt=True, row_length=64)(
        examples
    )


def padded_logits(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    return model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1]


def test_an_sdpa_model_attends_unit_by_unit_and_stays_sdpa_elsewhere(tmp_path):
    model = tiny()
    reference = tiny()  # the same weights, never given a packed batch
    batch = shared_batch()
    inputs = packed_model_inputs(model, batch)
    assert model.config._attn_implementation == SEGMENTS
    assert inputs["attention_mask"].shape == batch["packed_input_ids"].shape  # 2D, all ones
    assert inputs[LAYOUT_KEY] == [[(0, 4, 7, 9), (9, 11, 13, 17)]]
    with torch.no_grad():
        got = indexed_logits(model, inputs, batch["target_index"])
        # the padded path's logits of each sequence's targets, in the batch's target order
        want = torch.cat(
            [padded_logits(reference, p, c) for p, c in zip(PROMPTS, CHOSEN, strict=True)]
            + [padded_logits(reference, p, r) for p, r in zip(PROMPTS, REJECTED, strict=True)]
        )
        order = torch.argsort(batch["target_sequence"], stable=True)
        torch.testing.assert_close(got[order], want, rtol=1e-5, atol=1e-5)
        # a padded, left-padded batch after the switch: sdpa's own numbers
        ids = torch.tensor([[0, 0, 1, 5, 6], [1, 8, 11, 2, 3]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )
    model.save_pretrained(tmp_path)
    assert SEGMENTS not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_activation_checkpointing_recomputes_with_the_layout():
    """The spans travel as a keyword, so a checkpointed layer's recomputation in the backward
    attends unit by unit too: the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        batch = shared_batch()
        logits = indexed_logits(model, packed_model_inputs(model, batch), batch["target_index"])
        logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_a_sliding_window_model_takes_the_dense_mask():
    model = tiny(MistralForCausalLM, MistralConfig, sliding_window=4)
    inputs = packed_model_inputs(model, shared_batch())
    assert model.config._attn_implementation == "sdpa"
    assert inputs["attention_mask"].dim() == 4 and LAYOUT_KEY not in inputs
