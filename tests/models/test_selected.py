"""prefl.functional.selected: logits only at the scored positions, equal to slicing full logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prefl.data import build_toy_tokenizer
from prefl.functional import next_token_targets, projection, sequence_logps
from prefl.functional.selected import masked_sequence_logps, output_head, selected_logits
from prefl.models import CausalLMSpec, LoraSpec, build_causal_lm

CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
# right-padded prompt + completion rows; loss mask 1 on completion tokens
IDS = torch.tensor([[2, 7, 28, 55, 16, 24, 30, 3], [2, 10, 28, 17, 25, 3, 0, 0]])
ATTN = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
LOSS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]])


def model(tie: bool = False, lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = CausalLMSpec(
        config={**CONFIG, "tie_word_embeddings": tie},
        lora=LoraSpec(r=4, alpha=8) if lora else None,
    )
    m = build_causal_lm(spec, build_toy_tokenizer())
    if lora:  # nonzero adapters, so the LoRA path is visible in the logits
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return m.eval()


def head_rows(m: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Record how many hidden rows the output head projects per call."""
    rows: list[int] = []
    hook = output_head(m).register_forward_hook(
        lambda mod, args, out: rows.append(out.shape[:-1].numel())  # logits rows made
    )
    return rows, hook


def assert_selected_from_full_logits(m: torch.nn.Module, wrapped: torch.nn.Module) -> None:
    """``selected_logits`` on ``wrapped`` (around ``m``) takes the fallback: ``m``'s head projects
    every position, then the scored ones are selected, equal to the full forward's."""
    _, mask = next_token_targets(IDS, LOSS)
    rows, hook = head_rows(m)
    got = selected_logits(wrapped, IDS, ATTN, mask)
    hook.remove()
    assert rows == [IDS.numel()]  # every position projected, then selected
    torch.testing.assert_close(got, m(input_ids=IDS, attention_mask=ATTN).logits[mask])


@pytest.mark.parametrize("tie,lora", [(False, False), (True, False), (False, True)])
def test_selected_logits_equal_full_logits_at_the_positions(tie, lora):
    m = model(tie, lora)
    _, mask = next_token_targets(IDS, LOSS)
    full = m(input_ids=IDS, attention_mask=ATTN).logits[mask]
    rows, hook = head_rows(m)
    got = selected_logits(m, IDS, ATTN, mask)
    hook.remove()
    assert rows == [int(mask.sum())] == [8]  # 4 + 4 completion targets, not 2 * 8 positions
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_masked_sequence_logps_values_and_gradients_equal_the_full_path(tie, monkeypatch):
    """Also with the CPU paths of prefl.functional.projection on (a 7-row slice of the toy
    vocabulary; with tied weights, the embedding's sparse gradient)."""
    monkeypatch.setattr(projection, "SLICE_ROWS", 7)
    m = model(tie)
    labels, mask = next_token_targets(IDS, LOSS)
    full = sequence_logps(m(input_ids=IDS, attention_mask=ATTN).logits, labels, mask)
    full.sum().backward()
    expected = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    sums, lengths = masked_sequence_logps(m, IDS, ATTN, LOSS)
    sums.sum().backward()
    assert lengths.tolist() == [4, 4]  # every completion token is a target
    torch.testing.assert_close(sums, full, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        assert p.grad.layout == torch.strided, n  # every gradient ends dense
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=1e-5, msg=n)


def test_a_row_with_no_scored_token_sums_to_zero():
    m = model()
    loss = LOSS.clone()
    loss[1] = 0
    sums, lengths = masked_sequence_logps(m, IDS, ATTN, loss)
    assert lengths.tolist() == [4, 0]
    assert sums[1].item() == 0.0 and sums[0].item() < 0


class NoHead(torch.nn.Module):
    """A causal LM wrapper without ``get_output_embeddings``: the fallback path."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_a_model_without_an_output_head_falls_back_to_full_logits():
    m = model()
    wrapped = NoHead(m)
    assert output_head(wrapped) is None
    assert_selected_from_full_logits(m, wrapped)


class KeywordHead(torch.nn.Module):
    """Calls its output head with a keyword argument, so the pre-hook sees no positional input."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.lm_head = inner, inner.lm_head

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids, attention_mask, use_cache=False):
        hidden = self.inner.model(input_ids=input_ids, attention_mask=attention_mask)
        return SimpleNamespace(logits=self.lm_head(input=hidden.last_hidden_state))


def test_a_keyword_call_of_the_head_falls_back_to_selecting_from_full_logits():
    m = model()
    wrapped = KeywordHead(m)
    assert_selected_from_full_logits(m, wrapped)


def seen_in_forward(m: torch.nn.Module) -> tuple[list, list]:
    """Record, per forward, the head's output ``grad_fn`` name and the embedding's ``sparse``."""
    heads: list[str] = []
    sparse: list[bool] = []
    output_head(m).register_forward_hook(
        lambda mod, args, out: heads.append(type(out.grad_fn).__name__)
    )
    m.get_input_embeddings().register_forward_pre_hook(lambda mod, args: sparse.append(mod.sparse))
    return heads, sparse


@pytest.mark.parametrize("tie", [False, True])
def test_the_cpu_head_paths_are_on_during_the_forward_and_undone_after(tie, monkeypatch):
    """The head projects in slices; only a tied, trained embedding goes sparse; both are undone."""
    monkeypatch.setattr(projection, "SLICE_ROWS", 7)
    m = model(tie).train()
    heads, sparse = seen_in_forward(m)
    sums, _ = masked_sequence_logps(m, IDS, ATTN, LOSS)
    assert heads == ["_SlicedProjectionBackward"] and sparse == [tie]
    head, embedding = output_head(m), m.get_input_embeddings()
    assert "forward" not in vars(head) and embedding.sparse is False
    sums.sum().backward()
    sums2, _ = masked_sequence_logps(m, IDS, ATTN, LOSS)  # gradient accumulation: dense + sparse
    first = embedding.weight.grad.clone()
    sums2.sum().backward()
    assert embedding.weight.grad.layout == torch.strided
    torch.testing.assert_close(embedding.weight.grad, 2 * first, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # no gradient: the embedding stays dense
        masked_sequence_logps(m, IDS, ATTN, LOSS)
    assert sparse == [tie, tie, False]


def test_a_frozen_tied_embedding_and_a_lora_model_keep_the_plain_embedding(monkeypatch):
    monkeypatch.setattr(projection, "SLICE_ROWS", 7)
    frozen = model(tie=True)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    lora = model(lora=True)
    for m in (frozen, lora):
        heads, sparse = seen_in_forward(m)
        masked_sequence_logps(m, IDS, ATTN, LOSS)
        assert sparse == [False]
