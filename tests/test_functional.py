"""Tests for prefl.functional: masked reductions and chunked token/sequence log-probs.

Hand-derived values pin down the semantics (mask polarity, empty rows, Bessel's correction,
log-softmax of simple logits); comparisons with the naive ``log_softmax(...).gather(...)``
recipe check the chunked autograd function in value and gradient across shapes, chunk sizes
and dtypes.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefl.functional import (
    _check_inputs,
    _ChunkedTokenLogps,
    _chunks,
    masked_mean,
    masked_sum,
    masked_var,
    next_token_targets,
    sequence_logps,
    token_logps,
)
from prefl.functional.logps import default_chunk_rows


def naive_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logps = torch.log_softmax(logits.to(dtype), dim=-1)
    safe = labels.masked_fill(~mask.bool(), 0)
    return logps.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask


def naive_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    return naive_token_logps(logits, labels, mask).sum(-1)


def make_inputs(
    batch: int, seq: int, vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, seq, vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.rand(batch, seq, generator=gen) > 0.3
    mask[0, 0] = True  # at least one valid position
    labels = labels.masked_fill(~mask, -100)
    return logits, labels, mask


# --------------------------------------------------------------------------- masked reductions


def test_masked_sum_hand_values():
    """values = [[1, 2, 3], [4, 5, 6]], mask = [[1, 0, 1], [0, 0, 0]].

    Row sums: 1 + 3 = 4 and (nothing) = 0; total = 4.
    """
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert torch.equal(masked_sum(values, mask, dim=-1), torch.tensor([4.0, 0.0]))
    assert masked_sum(values, mask).item() == 4.0
    assert torch.equal(masked_sum(values, mask.bool(), dim=0), torch.tensor([1.0, 0.0, 3.0]))


def test_masked_mean_hand_values():
    """Same values/mask as above.

    Row 0: (1 + 3) / 2 = 2. Row 1 fully masked -> 0 (not NaN). Overall: 4 / 2 = 2.
    Column means: col0 1/1 = 1, col1 empty -> 0, col2 3/1 = 3.
    """
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert torch.equal(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 0.0]))
    assert masked_mean(values, mask).item() == 2.0
    assert torch.equal(masked_mean(values, mask, dim=0), torch.tensor([1.0, 0.0, 3.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_reductions_ignore_nan_at_masked_positions():
    """values = [1, nan, -inf, 5], mask = [1, 0, 0, 1]: sum 6, mean 3, var (4+4)/1 = 8."""
    values = torch.tensor([1.0, float("nan"), float("-inf"), 5.0])
    mask = torch.tensor([True, False, False, True])
    assert masked_sum(values, mask).item() == 6.0
    assert masked_mean(values, mask).item() == 3.0
    assert masked_var(values, mask).item() == 8.0


def test_masked_var_hand_values():
    """values = [1, 2, 3, 4], mask = [1, 1, 1, 0].

    mean = (1 + 2 + 3) / 3 = 2; squared deviations 1, 0, 1 sum to 2.
    biased = 2 / 3; unbiased = 2 / (3 - 1) = 1.
    """
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert masked_var(values, mask).item() == pytest.approx(1.0)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)


def test_masked_var_matches_torch_var_on_valid_entries():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(4, 7, generator=gen)
    mask = torch.rand(4, 7, generator=gen) > 0.4
    for unbiased in (True, False):
        expected = values[mask].var(unbiased=unbiased)
        assert torch.allclose(masked_var(values, mask, unbiased=unbiased), expected, atol=1e-6)


# --------------------------------------------------------------------------- log-probs by hand


def test_sequence_logps_equal_logits_is_minus_log_v():
    """V = 2 with equal logits: every token has log p = -log 2.

    mask = [[1, 1, 0], [0, 0, 0]] -> sums -2 log 2 and 0.
    """
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[0, 1, -100], [-100, 7, 1]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = sequence_logps(logits, labels, mask)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([-2 * math.log(2), 0.0]), atol=1e-7)


def test_token_logps_hand_values_and_gradient():
    """V = 3, logits [0, 0, ln 2] -> exp = [1, 1, 2], Z = 4, softmax = [1/4, 1/4, 1/2].

    label 2 -> log(1/2) = -log 2; label 0 -> log(1/4) = -2 log 2; third token masked.
    Sequence: -3 log 2. d logp / d logits = onehot(label) - softmax:
    label 2 -> [-1/4, -1/4, 1/2]; label 0 -> [3/4, -1/4, -1/2]; masked -> 0.
    """
    row = torch.tensor([0.0, 0.0, math.log(2)])
    logits = row.expand(1, 3, 3).clone().requires_grad_(True)
    labels = torch.tensor([[2, 0, -100]])
    mask = torch.tensor([[True, True, False]])
    tok = token_logps(logits, labels, mask, chunk_size=1)
    log2 = math.log(2)
    assert torch.allclose(tok, torch.tensor([[-log2, -2 * log2, 0.0]]), atol=1e-6)
    seq = sequence_logps(logits, labels, mask, chunk_size=2)
    assert torch.allclose(seq, torch.tensor([-3 * log2]), atol=1e-6)
    seq.sum().backward()
    expected = torch.tensor([[[-0.25, -0.25, 0.5], [0.75, -0.25, -0.5], [0.0, 0.0, 0.0]]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


# --------------------------------------------------------------------------- vs naive


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 4, 11), (1, 6, 5), (1, 1, 3)])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64, None])
def test_matches_naive_value_and_grad(shape, chunk_size):
    logits, labels, mask = make_inputs(*shape, seed=sum(shape))
    grad_out = torch.randn(shape[0], generator=torch.Generator().manual_seed(3))

    ours_in = logits.clone().requires_grad_(True)
    ours = sequence_logps(ours_in, labels, mask, chunk_size=chunk_size)
    (ours * grad_out).sum().backward()

    ref_in = logits.clone().requires_grad_(True)
    ref = naive_sequence_logps(ref_in, labels, mask)
    (ref * grad_out).sum().backward()

    assert ours.shape == (shape[0],)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours_in.grad, ref_in.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_token_logps_matches_naive_with_shifted_noncontiguous_logits(chunk_size):
    """Causal-shift usage: logits[:, :-1] cannot be flattened as a view (row-gather path)."""
    full, ids, mask = make_inputs(3, 6, 9, seed=5)
    full.requires_grad_(True)
    ours = token_logps(full[:, :-1], ids[:, 1:], mask[:, 1:], chunk_size=chunk_size)
    assert not full[:, :-1].is_contiguous()
    (ours * torch.arange(5.0)).sum().backward()
    ours_grad, full.grad = full.grad, None

    ref = naive_token_logps(full[:, :-1], ids[:, 1:], mask[:, 1:])
    (ref * torch.arange(5.0)).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours_grad, full.grad, atol=1e-5, rtol=1e-5)
    assert torch.all(ours_grad[:, -1] == 0)


def test_bf16_logits_match_naive_on_upcast_input():
    logits, labels, mask = make_inputs(2, 8, 33, seed=7, dtype=torch.bfloat16)
    ours_in = logits.clone().requires_grad_(True)
    ours = sequence_logps(ours_in, labels, mask, chunk_size=5)
    ours.sum().backward()
    assert ours.dtype == torch.float32
    assert ours_in.grad.dtype == torch.bfloat16

    ref_in = logits.float().requires_grad_(True)
    ref = naive_sequence_logps(ref_in, labels, mask)
    ref.sum().backward()
    assert torch.allclose(ours, ref, rtol=1e-2, atol=1e-2)
    assert torch.allclose(ours_in.grad.float(), ref_in.grad, rtol=1e-2, atol=1e-2)


def test_masked_labels_may_be_negative_or_out_of_range():
    logits, labels, mask = make_inputs(2, 6, 5, seed=11)
    labels = labels.clone()
    labels[~mask] = -100
    labels[1, ~mask[1]] = 10_000  # pad id beyond the vocabulary
    expected = naive_sequence_logps(logits, labels, mask)
    for chunk_size in (1, 4, None):
        out = sequence_logps(logits, labels, mask, chunk_size=chunk_size)
        assert torch.allclose(out, expected, atol=1e-5)


def test_batch_of_one():
    logits, labels, mask = make_inputs(1, 9, 6, seed=13)
    logits.requires_grad_(True)
    out = sequence_logps(logits, labels, mask, chunk_size=4)
    out.backward()
    ref_in = logits.detach().clone().requires_grad_(True)
    ref = naive_sequence_logps(ref_in, labels, mask)
    ref.backward()
    assert out.shape == (1,)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(logits.grad, ref_in.grad, atol=1e-5)


def test_float_and_int_masks_agree_with_bool_mask():
    logits, labels, mask = make_inputs(2, 5, 4, seed=17)
    expected = sequence_logps(logits, labels, mask)
    assert torch.equal(sequence_logps(logits, labels, mask.float()), expected)
    assert torch.equal(sequence_logps(logits, labels, mask.long()), expected)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_gradcheck_float64(chunk_size):
    logits, labels, mask = make_inputs(2, 3, 4, seed=19, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sequence_logps(x, labels, mask, chunk_size=chunk_size), (logits,)
    )
    assert torch.autograd.gradcheck(
        lambda x: token_logps(x, labels, mask, chunk_size=chunk_size), (logits,)
    )


def test_masked_positions_get_exactly_zero_gradient():
    logits, labels, mask = make_inputs(3, 7, 6, seed=23)
    # Garbage at masked positions must not leak into values or gradients.
    logits[~mask] = float("inf")
    logits.requires_grad_(True)
    out = sequence_logps(logits, labels, mask, chunk_size=4)
    assert torch.isfinite(out).all()
    assert torch.all(token_logps(logits, labels, mask)[~mask] == 0)
    out.sum().backward()
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)


def test_forward_saves_only_logits_and_small_vectors():
    """No (B, T, V)-sized tensor other than the caller's logits is kept for backward."""
    logits, labels, mask = make_inputs(2, 5, 7, seed=29)
    logits.requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _ChunkedTokenLogps.apply(logits, labels, mask, 3)
    big = [t for t in saved if t.numel() > labels.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    assert sum(t.numel() for t in saved if t is not big[0]) == 3 * labels.numel()


def test_invalid_inputs_raise():
    logits, labels, mask = make_inputs(2, 3, 4)
    with pytest.raises(ValueError):
        sequence_logps(logits[0], labels[0], mask[0])
    with pytest.raises(ValueError):
        sequence_logps(logits, labels[:, :2], mask)
    with pytest.raises(ValueError):
        sequence_logps(logits, labels.float(), mask)
    with pytest.raises(ValueError):
        sequence_logps(logits, labels, mask, chunk_size=0)


def test_default_chunk_rows_target_2_pow_24_elements():
    """rows = max(1, 2**24 // V): V = 2**20 -> 16 rows, V = 32000 -> 524, V > 2**24 -> 1."""

    def rows(vocab: int) -> int:
        logits = torch.empty(2, 3, vocab, device="meta")
        return _check_inputs(logits, torch.empty(2, 3, dtype=torch.long), torch.ones(2, 3), None)

    assert rows(2**20) == 16
    assert rows(32000) == 524
    assert rows(2**25) == 1


def test_on_a_cpu_the_default_chunk_is_2_pow_21_elements():
    """rows = max(1, 2**21 // V) on a CPU: V = 49152 -> 42, V = 32000 -> 65, V > 2**21 -> 1."""
    assert default_chunk_rows(torch.empty(0, 49152)) == 42
    assert default_chunk_rows(torch.empty(0, 32000)) == 65
    assert default_chunk_rows(torch.empty(0, 2**22)) == 1
    assert default_chunk_rows(torch.empty(0, 49152, device="meta")) == 341


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_chunks_are_views_covering_all_rows_in_order(shifted, chunk_size):
    full = torch.randn(3, 6, 4)
    logits = full[:, :-1] if shifted else full
    flat_ref = logits.reshape(-1, 4)
    expected_start = 0
    for start, stop, rows in _chunks(logits, chunk_size):
        assert start == expected_start and 0 < stop - start <= chunk_size
        assert rows.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
        assert torch.equal(rows, flat_ref[start:stop])
        expected_start = stop
    assert expected_start == flat_ref.shape[0]


def test_next_token_targets_hand_case():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    loss_mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    labels, mask = next_token_targets(ids, loss_mask)
    assert labels.tolist() == [[6, 7, 0, 5], [9, 0, 0, 8]]
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_next_token_targets_equals_slicing_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6))
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    full = sequence_logps(logits, *next_token_targets(ids, loss_mask))
    sliced = sequence_logps(logits[:, :-1], ids[:, 1:], loss_mask[:, 1:])
    torch.testing.assert_close(full, sliced, rtol=0, atol=1e-6)
    (g_full,) = torch.autograd.grad(full.sum(), logits)
    (g_sliced,) = torch.autograd.grad(sliced.sum(), logits)
    torch.testing.assert_close(g_full, g_sliced, rtol=0, atol=1e-6)
