"""Unit-by-unit attention over packed rows (prefl.functional.segments) against hand-derived
visibility and the dense-mask kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefl.functional import segments
from prefl.functional.segments import row_spans, segment_attention

# one row: a shared unit (prompt 0-1, chosen 2-3, rejected 4), a sequence unit (prompt 5, reply 6),
# then row padding (7-8, a unit of its own made of prompt-branch tokens)
SEGMENT = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2, 2]])
BRANCH = torch.tensor([[0, 0, 1, 1, 2, 0, 1, 0, 0]])
#: which keys each query sees, by hand: the rejected token 4 sees the prompt (0, 1) and itself,
#: never the chosen tokens 2-3; nothing crosses a unit
VISIBLE = {
    0: [0],
    1: [0, 1],
    2: [0, 1, 2],
    3: [0, 1, 2, 3],
    4: [0, 1, 4],
    5: [5],
    6: [5, 6],
    7: [7],
    8: [7, 8],
}


def test_row_spans_by_hand():
    assert row_spans(SEGMENT, BRANCH) == [[(0, 2, 4, 5), (5, 6, 7, 7), (7, 9, 9, 9)]]


def test_row_spans_rejects_a_unit_out_of_order():
    with pytest.raises(ValueError, match="unit at 0:3 is not laid out prompt, first, second"):
        row_spans(torch.tensor([[0, 0, 0]]), torch.tensor([[0, 2, 1]]))


def test_uniform_queries_average_exactly_the_visible_values():
    """Zero queries make every visible key equally likely, so with one-hot values each output
    row is 1/|visible| on the visible positions and 0 elsewhere."""
    length = SEGMENT.shape[1]
    query = torch.zeros(1, 1, length, 4)
    key = torch.randn(1, 1, length, 4)
    value = torch.eye(length).reshape(1, 1, length, length)
    out = segment_attention(query, key, value, row_spans(SEGMENT, BRANCH))[0, 0]
    want = torch.zeros(length, length)
    for q, keys in VISIBLE.items():
        want[q, keys] = 1.0 / len(keys)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


#: more rows of 9 positions: row 1 a sequence unit, then a shared unit; row 2 a shared unit
#: without a prompt (0:3), one without a first completion (3:7), then a sequence unit; row 3 two
#: shared units
MORE_SEGMENTS = [
    [0, 0, 0, 1, 1, 1, 1, 1, 1],
    [0, 0, 0, 1, 1, 1, 1, 2, 2],
    [0, 0, 0, 1, 1, 1, 1, 1, 1],
]
MORE_BRANCHES = [
    [0, 1, 1, 0, 0, 0, 1, 2, 2],
    [1, 1, 2, 0, 0, 2, 2, 0, 1],
    [0, 1, 2, 0, 0, 1, 2, 2, 2],
]
#: kernel calls: one a unit without a second completion, two a shared unit
PIECES = 4 + 3 + 5 + 4
NEW_TORCH = torch.__version__ >= (2, 5)


@pytest.mark.parametrize(
    ("kv_heads", "gqa_kernel"),
    # multi-head; grouped-query (2 queries a key) with the kernel's own grouped heads (CPU,
    # torch >= 2.5), and with the keys and values repeated (other devices, older torch)
    [
        (4, True),
        pytest.param(2, True, marks=pytest.mark.skipif(not NEW_TORCH, reason="torch < 2.5")),
        (2, False),
    ],
)
def test_equals_the_dense_mask_kernel_with_gradients(kv_heads, gqa_kernel, monkeypatch):
    monkeypatch.setattr(segments, "_GQA_KERNEL", gqa_kernel)
    calls = []
    attend = segments._attend
    monkeypatch.setattr(segments, "_attend", lambda *a: calls.append(a[-1]) or attend(*a))
    torch.manual_seed(0)
    rows, heads, dim = 4, 4, 8
    segment = torch.cat([SEGMENT, torch.tensor(MORE_SEGMENTS)])
    branch = torch.cat([BRANCH, torch.tensor(MORE_BRANCHES)])
    length = segment.shape[1]
    q = torch.randn(rows, heads, length, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(rows, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(rows, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    got = segment_attention(q, k, v, row_spans(segment, branch), scale=0.3)
    assert calls == [kv_heads < heads and gqa_kernel] * PIECES
    index = torch.arange(length)
    causal = index[:, None] >= index[None, :]
    same = segment[:, :, None] == segment[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    mask = (causal & same & visible)[:, None]
    groups = heads // kv_heads
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask, scale=0.3
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    wants = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
