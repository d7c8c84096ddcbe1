"""prefl.functional.projection: the LM head's projection in vocabulary slices on a CPU."""

from __future__ import annotations

import pytest
import torch

from prefl.functional.projection import cpu_head_speedups, vocab_projection


def test_hand_case_values_and_gradients():
    """hidden [1, 2] against rows [1, 0], [0, 1], [1, 1] (2 rows a slice): logits [1, 2, 3]; with
    an upstream gradient of ones, d hidden = the rows' sum [2, 2], d weight = hidden per row."""
    hidden = torch.tensor([[1.0, 2.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    logits = vocab_projection(hidden, weight, slice_rows=2)
    assert logits.tolist() == [[1.0, 2.0, 3.0]]
    logits.sum().backward()
    assert hidden.grad.tolist() == [[2.0, 2.0]]
    assert weight.grad.tolist() == [[1.0, 2.0]] * 3


@pytest.mark.parametrize("slice_rows", [1, 3, 7, 10])
def test_equals_linear_in_values_and_gradients(slice_rows):
    """(2, 5, 4) hidden states, a 10-row vocabulary: any slicing gives F.linear's logits and
    gradients (to float summation order)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    upstream = torch.randn(2, 5, 10)
    got = vocab_projection(hidden, weight, slice_rows=slice_rows)
    grads = torch.autograd.grad(got, (hidden, weight), upstream)
    want = torch.nn.functional.linear(hidden, weight)
    expected = torch.autograd.grad(want, (hidden, weight), upstream)
    assert got.shape == (2, 5, 10)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_slices_only_on_a_cpu_without_bias_or_autocast_and_with_more_than_one_slice():
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    assert type(vocab_projection(hidden, weight, slice_rows=4).grad_fn).__name__ == (
        "_SlicedProjectionBackward"
    )
    one_slice = vocab_projection(hidden, weight, slice_rows=10)
    with_bias = vocab_projection(hidden, weight, torch.ones(10), slice_rows=4)
    assert "Sliced" not in type(one_slice.grad_fn).__name__
    assert "Sliced" not in type(with_bias.grad_fn).__name__
    expected = torch.nn.functional.linear(hidden, weight, torch.ones(10))
    torch.testing.assert_close(with_bias, expected, atol=0.0, rtol=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision keeps autocast's linear
        mixed = vocab_projection(hidden, weight, slice_rows=4)
        expected = torch.nn.functional.linear(hidden, weight)
    assert mixed.dtype == torch.bfloat16 and "Sliced" not in type(mixed.grad_fn).__name__
    torch.testing.assert_close(mixed, expected, atol=0.0, rtol=0.0)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="slice_rows must be a positive"):
        vocab_projection(torch.ones(1, 2), torch.ones(3, 2), slice_rows=0)
    with pytest.raises(ValueError, match=r"hidden size 5 does not match the weight's \(3, 2\)"):
        vocab_projection(torch.ones(1, 5), torch.ones(3, 2))


def test_the_logits_are_a_tensor_of_their_own_that_may_be_modified_in_place():
    """Not a view (as F.linear's are not): a model may scale its logits in place."""
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    logits = vocab_projection(hidden, weight, slice_rows=4)
    assert not logits._is_view()
    logits.mul_(2.0).sum().backward()
    torch.testing.assert_close(weight.grad, 2.0 * hidden.detach()[0].sum(0).expand(10, 4))


def test_a_compiled_model_keeps_its_plain_head():
    """``torch.compile``'s wrapper (``_orig_mod``) is left alone: no patch to recompile over."""
    head = torch.nn.Linear(4, 10, bias=False)
    plain = torch.nn.Module()
    plain.lm_head = head
    with cpu_head_speedups(plain, head):
        assert "forward" in vars(head)
    assert "forward" not in vars(head)
    compiled = torch.nn.Module()
    compiled._orig_mod = plain
    with cpu_head_speedups(compiled, head):
        assert "forward" not in vars(head)
