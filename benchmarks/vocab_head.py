"""The LM head of a packed HH batch on a CPU: prefl's vocabulary-sliced projection, cache-sized
log-softmax chunks and sparse tied-embedding gradient, against the plain ops they replace.

One 4-pair batch of prompt-shared HH rows in SmolLM2's chat template holds about 771 tokens, of
which 336 are completion targets projected through SmolLM2's tied 49k x 576 embedding. Both
variants embed the row (a stand-in scale for the transformer body), project the target
positions, score them with ``prefl.functional.token_logps`` and, for ``policy``, run the
backward; ``reference`` is the same without gradients (the reference model's path):

- ``plain``: ``F.linear``, one log-softmax chunk of ``2**24`` elements (prefl's chunk before this
  change, and its GPU chunk), the embedding's dense gradient added to the head's.
- ``prefl``: :func:`prefl.functional.projection.vocab_projection` (1024-row vocabulary slices),
  ``2**21``-element chunks, the embedding's sparse gradient added into the head's dense one.

Both give the same log-probs and gradients (checked each run). The variants alternate, ``--rounds``
times; the table gives medians and ratios, and ``--json`` (default
``benchmarks/results/vocab_head.json``) keeps them.

Run (about a minute on 2 CPU cores)::

    python benchmarks/vocab_head.py [--tokens 771 --targets 336 --rounds 9 --threads 2]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from trl_report import micro_parser, write_timings

from prefl.functional import token_logps
from prefl.functional.logps import default_chunk_rows
from prefl.functional.projection import vocab_projection

RESULTS = Path(__file__).resolve().parent / "results" / "vocab_head.json"
VOCAB, HIDDEN = 49152, 576
VARIANTS = ("plain", "prefl")


def run(name: str, inputs: dict[str, Any], grad: bool) -> tuple[float, torch.Tensor, Any]:
    """Seconds of one pass of variant ``name`` (forward, and backward when ``grad``), its summed
    log-probs and the embedding's gradient."""
    weight = inputs["weight"].detach().requires_grad_(grad)
    scale = inputs["scale"].detach().requires_grad_(grad)
    ids, index, labels = inputs["ids"], inputs["index"], inputs["labels"]
    plain = name == "plain"
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        hidden = F.embedding(ids, weight, sparse=grad and not plain) * scale
        selected = hidden[index].unsqueeze(0)
        logits = F.linear(selected, weight) if plain else vocab_projection(selected, weight)
        rows = max(1, 2**24 // VOCAB) if plain else default_chunk_rows(logits)
        mask = torch.ones_like(labels, dtype=torch.bool)
        total = token_logps(logits, labels, mask, chunk_size=rows).sum()
        if grad:
            total.backward()
    return time.perf_counter() - start, total.detach(), weight.grad


def make_inputs(tokens: int, targets: int, seed: int) -> dict[str, Any]:
    """A random tied embedding, one row of ``tokens`` ids and ``targets`` target positions."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02,
        "scale": torch.ones(HIDDEN) * 50.0,
        "ids": torch.randint(0, VOCAB, (tokens,), generator=gen),
        "index": torch.randperm(tokens, generator=gen)[:targets].sort().values,
        "labels": torch.randint(0, VOCAB, (1, targets), generator=gen),
    }


def check_equal(inputs: dict[str, Any]) -> None:
    """Both variants give the same log-probs and embedding gradient (float summation order)."""
    _, want, want_grad = run("plain", inputs, grad=True)
    _, got, got_grad = run("prefl", inputs, grad=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    assert got_grad.layout == torch.strided
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the variants alternately, with and without gradients, and print the table."""
    parser = micro_parser(__doc__.split("\n")[0], rounds=9, results=RESULTS)
    parser.add_argument("--tokens", type=int, default=771, help="tokens of the packed row")
    parser.add_argument("--targets", type=int, default=336, help="positions projected")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.tokens, args.targets, args.seed)
    check_equal(inputs)  # also the warm-up
    passes = {"policy": True, "reference": False}
    times = {f"{p}/{n}": [] for p in passes for n in VARIANTS}
    for r in range(args.rounds):
        for p, grad in passes.items():
            for n in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                times[f"{p}/{n}"].append(run(n, inputs, grad)[0])
    medians = {k: statistics.median(t) for k, t in times.items()}
    print(f"LM head of {args.targets} of {args.tokens} positions, V={VOCAB}, H={HIDDEN}, ms:")
    print("| pass | plain | prefl | plain / prefl |\n|---|---|---|---|")
    for p in passes:
        a, b = medians[f"{p}/plain"], medians[f"{p}/prefl"]
        print(f"| {p} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f} |")
    return write_timings(args, "vocab_head", medians, times, vocab=VOCAB, hidden=HIDDEN)


if __name__ == "__main__":
    main()
