"""Packed attention, forward + backward, on HH-shaped rows: prefl's unit-by-unit attention against
the dense-mask kernel and against the same unit loop written with slices.

``prefl.functional.segment_attention`` cuts each packed row into its units' pieces with ``split``
and, on a CPU, passes grouped-query key/value heads to the kernel as they are (``enable_gqa``).
The baseline ``sliced`` is the same unit loop written with slices, as prefl's first version
computed it: the row sliced per unit (the backward of each slice zero-fills a full-row gradient
and adds it to the others) and the key and value heads repeated to the query heads (its small
masks built per call, the default scale). ``dense`` is one ``sdpa`` call over the row with the
layout's ``(L, L)`` mask. Each row holds ``--pairs`` prompt-shared HH pairs (prompt | chosen |
rejected) of the mean HH lengths in SmolLM2's chat template (112 / 38 / 46 tokens, varied ±50%,
seeded), with SmolLM2's attention shape (9 query heads, 3 key/value heads, head size 64). The
variants alternate, ``--rounds`` times; the table gives medians and ratios, and ``--json`` (default
``benchmarks/results/segment_attention.json``) keeps them.

Run (a few seconds on 2 CPU cores)::

    python benchmarks/segment_attention.py [--pairs 4 --rounds 7 --threads 2]
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from trl_report import micro_parser, write_timings

from prefl.functional.segments import Span, row_spans, segment_attention
from prefl.models.packed import layout_mask

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
MEAN_TOKENS = (112, 38, 46)
RESULTS = Path(__file__).resolve().parent / "results" / "segment_attention.json"


def sliced_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[list[Span]]
) -> torch.Tensor:
    """The baseline: per unit, slices of the whole row; key/value heads repeated."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    rows = []
    for r, row in enumerate(spans):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        parts = []
        for s, p, c, e in row:
            parts.append(
                F.scaled_dot_product_attention(
                    q[..., s:c, :], k[..., s:c, :], v[..., s:c, :], is_causal=True
                )
            )
            if e > c:
                mask = torch.ones(e - c, p - s + e - c, dtype=torch.bool).tril(p - s)
                keys = torch.cat([k[..., s:p, :], k[..., c:e, :]], 2)
                values = torch.cat([v[..., s:p, :], v[..., c:e, :]], 2)
                parts.append(F.scaled_dot_product_attention(q[..., c:e, :], keys, values, mask))
        rows.append(torch.cat(parts, 2))
    return torch.cat(rows, 0)


def dense_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One ``sdpa`` call with the layout's dense mask."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(query, key, value, mask)


def hh_row(pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, L)`` segment and branch tensors of one row of prompt-shared pairs."""
    rng = random.Random(seed)
    segment: list[int] = []
    branch: list[int] = []
    for unit in range(pairs):
        for kind, mean in enumerate(MEAN_TOKENS):
            n = max(1, round(mean * rng.uniform(0.5, 1.5)))
            segment += [unit] * n
            branch += [kind] * n
    return torch.tensor([segment]), torch.tensor([branch])


def time_variant(name: str, inputs: dict[str, Any]) -> float:
    """Seconds of one forward + backward of ``name`` over the row."""
    q, k, v = (inputs[x].detach().requires_grad_() for x in "qkv")
    start = time.perf_counter()
    if name == "prefl":
        out = segment_attention(q, k, v, inputs["spans"])
    elif name == "sliced":
        out = sliced_attention(q, k, v, inputs["spans"])
    else:
        out = dense_attention(q, k, v, inputs["mask"])
    out.square().sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the variants alternately and print the table."""
    parser = micro_parser(__doc__.split("\n")[0], rounds=7, results=RESULTS)
    parser.add_argument("--pairs", type=int, default=4, help="prompt-shared pairs per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    segment, branch = hh_row(args.pairs, args.seed)
    length = segment.shape[1]
    inputs = {
        "q": torch.randn(1, HEADS, length, HEAD_DIM),
        "k": torch.randn(1, KV_HEADS, length, HEAD_DIM),
        "v": torch.randn(1, KV_HEADS, length, HEAD_DIM),
        "spans": row_spans(segment, branch),
        "mask": layout_mask(segment, branch),
    }
    names = ["prefl", "sliced", "dense"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        time_variant(n, inputs)
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(time_variant(n, inputs))
    medians = {n: statistics.median(t) for n, t in times.items()}
    print(f"one row of {args.pairs} shared HH pairs ({length} tokens), forward + backward, ms:")
    print("| variant | median ms | × prefl |\n|---|---|---|")
    for n in names:
        print(f"| {n} | {medians[n] * 1e3:.1f} | {medians[n] / medians['prefl']:.2f} |")
    return write_timings(args, "segment_attention", medians, times, row_tokens=length)


if __name__ == "__main__":
    main()
