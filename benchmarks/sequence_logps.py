"""Benchmark naive vs chunked sequence log-probabilities: forward+backward time and peak memory.

Why: ``prefl.functional.sequence_logps`` exists to avoid materialising the full ``(B, T, V)``
float32 log-softmax. This script measures what that buys (peak extra memory) and what it
costs (time) against the naive ``log_softmax(logits.float(), -1).gather(...)`` recipe, for
several vocabulary sizes.

Each (variant, V) pair runs in a fresh subprocess (``--worker``) so peak memory is not
polluted by earlier runs. The worker allocates causally-shifted inputs the way a trainer would
(``logits[:, :-1]`` scores ``ids[:, 1:]``; ``--no-shift`` passes whole contiguous logits
instead), then times ``repeats`` forward+backward passes after one warm-up. Peak extra memory
is, on CPU, peak RSS (``ru_maxrss``) minus the RSS right after the inputs were allocated; on
CUDA, ``torch.cuda.max_memory_allocated`` minus the memory allocated after the inputs. Both
include the (B, T, V) gradient of the logits, which either variant must produce.

Example::

    python benchmarks/sequence_logps.py --batch 2 --seq 256 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from prefl.functional import next_token_targets, sequence_logps

VARIANTS = ("naive", "chunked", "chunked_shift_labels")
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
RESULT_PREFIX = "RESULT "


def naive_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Reference: materialises the full (B, T, V) float32 log-softmax (kept for backward)."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    safe = labels.masked_fill(~mask, 0)
    return (logps.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 131072])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bf16 CUDA"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk")
    parser.add_argument(
        "--no-shift",
        action="store_true",
        help="pass contiguous (B, T, V) logits instead of the causally shifted logits[:, :-1]",
    )
    parser.add_argument(
        "--no-grad",
        action="store_true",
        help="forward only under torch.no_grad (the frozen reference model's log-probs)",
    )
    parser.add_argument("--json", default="benchmarks/results/sequence_logps.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bf16"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), falling back to the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def make_inputs(
    args: argparse.Namespace, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs as a trainer has them: (B, T+1, V) logits, (B, T+1) ids and loss mask.

    With ``--no-shift`` the logits are (B, T, V) and scored whole against the ids as they are.
    """
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.batch, args.seq + (0 if args.no_shift else 1))
    logits = torch.randn(
        *shape, vocab, generator=gen, device=args.device, dtype=DTYPES[args.dtype]
    ).requires_grad_(not args.no_grad)
    ids = torch.randint(0, vocab, shape, generator=gen, device=args.device)
    mask = torch.ones(shape, dtype=torch.bool, device=args.device)
    mask[:, : args.seq // 4] = False  # the prompt is not scored
    return logits, ids, mask


def score(args: argparse.Namespace, logits, ids, mask) -> torch.Tensor:
    """One call of the variant, with the causal shift done the variant's way.

    ``naive`` and ``chunked`` slice the logits (``logits[:, :-1]`` against ``ids[:, 1:]``);
    ``chunked_shift_labels`` scores the full logits against ``next_token_targets`` (prefl's way).
    """
    if args.no_shift:
        labels, m, x = ids.masked_fill(~mask, -100), mask, logits
    elif args.variant == "chunked_shift_labels":
        (labels, m), x = next_token_targets(ids, mask), logits
    else:
        labels, m, x = ids[:, 1:].masked_fill(~mask[:, 1:], -100), mask[:, 1:], logits[:, :-1]
    if args.variant == "naive":
        return naive_sequence_logps(x, labels, m)
    return sequence_logps(x, labels, m, chunk_size=args.chunk_size)


def run_worker(args: argparse.Namespace) -> dict:
    vocab = args.vocab[0]
    logits, ids, mask = make_inputs(args, vocab)

    cuda = args.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_bytes()

    times, checksum = [], 0.0
    for i in range(args.repeats + 1):  # the first pass is a warm-up
        logits.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(not args.no_grad):
            out = score(args, logits, ids, mask)
            if not args.no_grad:
                out.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
        checksum = out.detach().double().sum().item()

    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {
        "variant": args.variant,
        "vocab": vocab,
        "median_ms": 1e3 * statistics.median(times),
        "times_ms": [1e3 * t for t in times],
        "peak_extra_mib": (peak - base) / 2**20,
        "input_mib": logits.numel() * logits.element_size() / 2**20,
        "checksum": checksum,
    }


def spawn_worker(args: argparse.Namespace, variant: str, vocab: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant]
    cmd += ["--vocab", str(vocab), "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.no_shift:
        cmd.append("--no-shift")
    if args.no_grad:
        cmd.append("--no-grad")
    # A fixed glibc mmap threshold makes big CPU buffers go straight back to the OS when freed,
    # so peak RSS tracks live tensors rather than allocator caching (ignored off glibc).
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20), **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"variant": variant, "vocab": vocab, "error": " | ".join(tail)}
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def print_table(rows: list[dict]) -> None:
    header = f"{'variant':<20} {'V':>7} {'median ms':>10} {'peak extra MiB':>15}"
    header += f" {'time x naive':>13} {'mem x naive':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<20} {r['vocab']:>7} ERROR: {r['error']}")
            continue
        print(
            f"{r['variant']:<20} {r['vocab']:>7} {r['median_ms']:>10.1f} "
            f"{r['peak_extra_mib']:>15.1f} {r.get('time_ratio', float('nan')):>13.2f} "
            f"{r.get('mem_ratio', float('nan')):>12.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_worker(args)), flush=True)
        return

    rows = []
    for vocab in args.vocab:
        results = {v: spawn_worker(args, v, vocab) for v in VARIANTS}
        naive = results["naive"]
        for res in results.values():
            if "error" not in res and "error" not in naive:
                res["time_ratio"] = res["median_ms"] / naive["median_ms"]
                res["mem_ratio"] = res["peak_extra_mib"] / max(naive["peak_extra_mib"], 1e-9)
                res["abs_diff_vs_naive"] = abs(res["checksum"] - naive["checksum"])
            rows.append(res)

    shift = "logits[:, :-1]" if not args.no_shift else "whole logits"
    mode = "forward only" if args.no_grad else "forward+backward"
    print(
        f"B={args.batch} T={args.seq} dtype={args.dtype} device={args.device} {shift} {mode} ",
        end="",
    )
    print(f"repeats={args.repeats} torch={torch.__version__} threads={torch.get_num_threads()}")
    print_table(rows)
    meta = {k: getattr(args, k) for k in ("batch", "seq", "repeats", "device", "dtype", "vocab")}
    meta.update(
        chunk_size=args.chunk_size,
        no_grad=args.no_grad,
        shifted=not args.no_shift,
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cuda_device=torch.cuda.get_device_name() if args.device == "cuda" else None,
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.no_grad:
        print("peak extra includes the (B, T, V) logits gradient; the slice backward adds one more")


if __name__ == "__main__":
    main()
