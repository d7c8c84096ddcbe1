"""Driver of the real-data (``--data hh``) benchmarks: several *variants* (a library plus its
settings) run side by side in one invocation, as :mod:`trl_report` runs two libraries.

Each round runs every variant once, as a fresh subprocess (``--worker <lib> --variant <name>``),
the order rotating by one each round so that no variant always runs first or last; peak RSS is
the child's ``ru_maxrss``. Besides :func:`trl_harness.finish_worker`'s numbers, each worker
reports the token accounting of its timed steps (:func:`hh_data.batch_tokens`): data tokens
(prompt counted once per sequence), computed positions and real (non-padding) positions. The
summary gives per variant the medians over rounds of: data tokens/s; pairs (rows) per second at
the data set's mean length (data tokens/s ÷ mean data tokens per pair of the JSONL, which no
batch order biases); raw pairs/s over the timed window; the padding share of computed positions;
peak RSS; and the ratios against two baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_report import RESULTS_DIR, machine_info, run_worker, worker_argv


@dataclass(frozen=True)
class Variant:
    """One side of the comparison: ``name`` (as ``--variant``), its library, and a description."""

    name: str
    lib: str
    about: str
    tags: tuple[str, ...] = field(default=())


def timed_tokens(counts: Sequence[dict[str, int]], steps: int, warmup: int) -> dict[str, float]:
    """Sum the batch counts of the timed steps (``warmup < step <= steps``; steps count from 1),
    and the padding share of their computed positions."""
    first = warmup if warmup else 1
    timed = list(counts[first:steps])
    total = {key: float(sum(c[key] for c in timed)) for key in ("data", "real", "computed")}
    total["padding_share"] = 1.0 - total["real"] / total["computed"] if total["computed"] else 0.0
    return total


def token_result(
    counts: Sequence[dict[str, int]], ends: Sequence[float], cpu: Sequence[float], warmup: int
) -> dict[str, Any]:
    """A worker's token numbers: the timed steps' sums, and data tokens per second of the window
    (between the end of step ``warmup`` and the last) by the wall clock and per CPU second."""
    first = warmup - 1 if warmup else 0
    tokens = timed_tokens(counts, len(ends), warmup)
    return {
        "tokens": tokens,
        "data_tokens_per_s": tokens["data"] / (ends[-1] - ends[first]),
        "data_tokens_per_cpu_s": tokens["data"] / (cpu[-1] - cpu[first]),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize_variants(
    runs: list[dict[str, Any]], variants: Sequence[Variant], tokens_per_sample: float
) -> dict[str, Any]:
    """Medians per variant over its runs, and each variant's ratios: throughput against the
    first variant of each library (``vs_<name>``), peak RSS against the first prefl one."""
    out: dict[str, Any] = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v.name]
        rate = _median([r["data_tokens_per_s"] for r in mine])
        out[v.name] = {
            "lib": v.lib,
            "about": v.about,
            "data_tokens_per_s": rate,
            "samples_per_s": rate / tokens_per_sample,
            "raw_samples_per_s": _median([r["throughput"] for r in mine]),
            "data_tokens_per_cpu_s": _median([r["data_tokens_per_cpu_s"] for r in mine]),
            "real_tokens_per_s": _median(
                [r["data_tokens_per_s"] * r["tokens"]["real"] / r["tokens"]["data"] for r in mine]
            ),
            "padding_share": _median([r["tokens"]["padding_share"] for r in mine]),
            "median_step_s": _median([t for r in mine for t in r["timed_step_times_s"]]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in mine]),
            "runs": len(mine),
        }
    libs = dict.fromkeys(v.lib for v in variants)
    bases = {lib: next(v.name for v in variants if v.lib == lib) for lib in libs}
    for v in variants:
        row = out[v.name]
        for base in bases.values():
            row[f"speed_vs_{base}"] = row["data_tokens_per_s"] / out[base]["data_tokens_per_s"]
            cpu = row["data_tokens_per_cpu_s"] / out[base]["data_tokens_per_cpu_s"]
            row[f"cpu_speed_vs_{base}"] = cpu
        if "prefl" in bases:
            row["rss_vs_prefl_base"] = row["peak_rss_mib"] / out[bases["prefl"]]["peak_rss_mib"]
    return out


def variants_table(summary: dict[str, Any], variants: Sequence[Variant], unit: str, title: str):
    """The summary as a markdown table, one row per variant."""
    first = summary[variants[0].name]
    bases = [k[len("speed_vs_") :] for k in first if k.startswith("speed_vs_")]
    head = [
        "variant",
        f"{unit}/s",
        "data tok/s",
        "real tok/s",
        "padding",
        "step (s)",
        "peak RSS (MiB)",
        "data tok/CPU-s",
        *[f"× {b} (wall; CPU)" for b in bases],
        "RSS ÷ prefl base",
    ]
    n = min(summary[v.name]["runs"] for v in variants)
    lines = [f"**{title}** (median of {n} runs each)", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for v in variants:
        s = summary[v.name]
        cells = [
            v.name,
            f"{s['samples_per_s']:.2f}",
            f"{s['data_tokens_per_s']:.0f}",
            f"{s['real_tokens_per_s']:.0f}",
            f"{100 * s['padding_share']:.0f}%",
            f"{s['median_step_s']:.2f}",
            f"{s['peak_rss_mib']:.0f}",
            f"{s['data_tokens_per_cpu_s']:.0f}",
            *[f"{s[f'speed_vs_{b}']:.2f}; {s[f'cpu_speed_vs_{b}']:.2f}" for b in bases],
            f"{s.get('rss_vs_prefl_base', float('nan')):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_variants(
    script: Path,
    args: argparse.Namespace,
    prepare: Callable[[Path, argparse.Namespace], dict[str, Any]],
    meta: dict[str, Any],
    variants: Sequence[Variant],
) -> dict[str, Any]:
    """Prepare the shared inputs, run ``args.repeats`` rotating rounds of every variant, print
    the table and write the JSON (``args.json`` or ``results/<meta name>.json``).

    Args:
        script: The benchmark script (run again as each worker).
        args: Its parsed options.
        prepare: Writes the model directory and the data into the work directory; returns the
            data's statistics, with ``mean_tokens`` (prompt, chosen[, rejected]) of the rows.
        meta: ``name``, ``unit``, ``title`` and ``matched``, copied into the JSON.
        variants: What to run; the first of each library is that library's baseline.
    """
    # idle OpenMP threads sleep instead of spinning, so that CPU time counts work even where
    # other jobs share the cores (the wall clock is reported next to it)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    machine = machine_info()
    machine["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    with tempfile.TemporaryDirectory(prefix=f"{meta['name']}_") as tmp:
        workdir = Path(tmp)
        data = prepare(workdir, args)
        runs = []
        for repeat in range(args.repeats):
            shift = repeat % len(variants)
            for v in [*variants[shift:], *variants[:shift]]:
                argv = [*worker_argv(script, v.lib, args, workdir), "--variant", v.name]
                result = run_worker(argv, args.threads, workdir / f"{v.name}_{repeat}.log")
                result.update(lib=v.lib, variant=v.name, repeat=repeat)
                runs.append(result)
                print(
                    f"  round {repeat + 1}/{args.repeats} {v.name:14s}: "
                    f"{result['data_tokens_per_s']:.0f} data tok/s, padding "
                    f"{100 * result['tokens']['padding_share']:.0f}%, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    prompt, *replies = data["mean_tokens"]
    per_sample = len(replies) * prompt + sum(replies)
    summary = summarize_variants(runs, variants, per_sample)
    print(variants_table(summary, variants, meta["unit"], meta["title"]))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine["load_average_at_end"] = list(os.getloadavg())
    payload = {**meta, "config": config, "machine": machine, "data": data, "summary": summary}
    payload["data_tokens_per_sample"] = per_sample
    payload["runs"] = runs
    out = args.json or RESULTS_DIR / f"{meta['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return payload
