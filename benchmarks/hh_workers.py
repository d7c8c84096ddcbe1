"""Worker-side helpers of the layout benchmarks (``--data hh``, and ``--layouts`` on toy rows):
options, the prefl data module of a variant, counted TRL collators, the result line.

prefl variants are named by their layout: ``prefl_padded`` (right-padded rows),
``prefl_packed`` (``packing=True``), ``prefl_shared`` (``packing=True, share_prompt=True``) and
``prefl_grouped`` (padded, ``group_by_length=True``). TRL variants: ``trl_default`` (its default
random sampler) and ``trl_grouped`` (``train_sampling_strategy="group_by_length"``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hh_data import CountingCollator, prepare_hh
from layout_report import Variant, token_result
from trl_harness import StepClock, finish_worker, toy_pair_rows, write_jsonl

PREFL_LAYOUTS: dict[str, dict[str, Any]] = {
    "prefl_padded": {},
    "prefl_packed": {"packing": True},
    "prefl_shared": {"packing": True, "share_prompt": True},
    "prefl_grouped": {"group_by_length": True},
}
TRL_SAMPLERS = {"trl_default": "random", "trl_grouped": "group_by_length"}
ABOUT = {
    "prefl_padded": "prefl, right-padded rows (the default layout)",
    "prefl_packed": "prefl, packing=True",
    "prefl_shared": "prefl, packing=True + share_prompt=True",
    "prefl_grouped": "prefl, padded rows, group_by_length=True",
    "trl_default": "TRL at its defaults (random sampler, padded)",
    "trl_grouped": "TRL best here: train_sampling_strategy='group_by_length'",
}


def variants(names: list[str]) -> list[Variant]:
    """The :class:`Variant` of each name (the library is its prefix)."""
    return [Variant(n, n.split("_")[0], ABOUT[n]) for n in names]


def add_layout_options(parser: argparse.ArgumentParser, hh_defaults: dict[str, Any]) -> None:
    """``--data``, ``--layouts``, ``--variants``, ``--layers`` and the hidden ``--variant``;
    ``hh_defaults`` replace the toy defaults when ``--data hh`` is given."""
    parser.add_argument("--data", choices=("toy", "hh"), default="toy", help="toy rows or HH")
    parser.add_argument(
        "--layouts", action="store_true", help="toy data: compare prefl's layouts (no TRL)"
    )
    parser.add_argument("--variants", default=None, help="comma-separated variant names")
    parser.add_argument("--layers", type=int, default=None, help="hh model layers (default 10)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(_hh_defaults=hh_defaults)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, with the ``--data hh`` defaults where the option was not given."""
    first = parser.parse_args(argv)
    if first.data == "hh":
        parser.set_defaults(**first._hh_defaults)
    args = parser.parse_args(argv)
    del args._hh_defaults
    return args


def toy_mean_tokens(rows: list[dict[str, str]], keys: tuple[str, ...]) -> list[float]:
    """Mean tokens of the toy rows under the word-level tokenizer: ``<bos>`` + prompt words, and
    each completion's words + ``<eos>``."""
    first = [1 + len(r["prompt"].split()) for r in rows]
    rest = [[len(r[k].split()) + 1 for r in rows] for k in keys]
    return [sum(col) / len(rows) for col in [first, *rest]]


def prepare_layouts(workdir: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The model directory and ``pairs.jsonl``: every HH row that fits (:func:`hh_data.prepare_hh`;
    each run trains on the first ``batch × steps`` rows of its sampler's order, and the
    length-grouped samplers group within windows of 50 batches or more, as on a real data set),
    or ``batch × steps`` toy rows (every run sees each once)."""
    n_rows = args.batch * args.steps
    if args.data == "hh":
        stats = prepare_hh(workdir, args)
        if mode == "sft":
            stats["mean_tokens"] = stats["mean_tokens"][:2]
        return stats
    from trl_harness import build_model_dir

    build_model_dir(workdir / "model", seed=args.seed)
    rows = toy_pair_rows(n_rows, seed=args.seed)
    write_jsonl(workdir / "pairs.jsonl", rows)
    keys = ("chosen",) if mode == "sft" else ("chosen", "rejected")
    return {"rows": n_rows, "mean_tokens": toy_mean_tokens(rows, keys)}


def prefl_layout_data(args: argparse.Namespace, mode: str) -> tuple[Any, CountingCollator]:
    """prefl's data module for ``args.variant`` over ``pairs.jsonl``, its collator counted."""
    from prefl import PreferenceDataModule

    layout = PREFL_LAYOUTS[args.variant]
    data = PreferenceDataModule(
        dataset=str(args.workdir / "pairs.jsonl"),
        tokenizer=str(args.workdir / "model"),
        mode=mode,
        row_format="conversational" if args.data == "hh" else "auto",
        val_split=None,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch,
        seed=args.seed,
        **layout,
    )
    data.collator = counter = CountingCollator(data.collator)
    return data, counter


def trl_layout_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainingArguments`` a TRL variant adds to :func:`trl_harness.trl_common_args`."""
    return {"train_sampling_strategy": TRL_SAMPLERS[args.variant]}


def longest_sequence(example: dict[str, Any]) -> dict[str, int]:
    """A tokenized pair's ``length`` column: its longer sequence (what sets the padded length)."""
    prompt = len(example.get("prompt_ids", ()))
    return {"length": prompt + max(len(example["chosen_ids"]), len(example["rejected_ids"]))}


def count_trl(trainer: Any, args: argparse.Namespace) -> CountingCollator:
    """Wrap a TRL trainer's collator (before ``train()`` builds the data loader) to count it; for
    ``trl_grouped``, give its tokenized data set the ``length`` column that the length-grouped
    sampler reads (kept through the unused-column removal)."""
    if args.variant == "trl_grouped":
        trainer.train_dataset = trainer.train_dataset.map(longest_sequence)
        trainer._set_signature_columns_if_needed()
        trainer._signature_columns = [*trainer._signature_columns, "length"]
    trainer.data_collator = counter = CountingCollator(trainer.data_collator)
    return counter


def finish_layout_worker(
    clock: StepClock, args: argparse.Namespace, counter: CountingCollator
) -> None:
    """Print the worker's result line with the token accounting of its timed steps."""
    extra = token_result(counter.counts, clock.ends, clock.cpu, args.warmup)
    extra["variant"] = args.variant
    rows = args.workdir / "rows.json"
    if rows.exists():
        extra["rows"] = json.loads(rows.read_text())
    finish_worker(clock, args, samples_per_step=args.batch, extra=extra)
