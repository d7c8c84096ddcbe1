"""SFT throughput and peak memory: prefl's ``SFTModule`` on right-padded rows against the same rows
packed (``PreferenceDataModule(packing=True)``), prefl only.

Both variants train the same model on the same rows (``prompt`` + the ``chosen`` reply of each
pair in ``pairs.jsonl``; the first ``batch × steps`` rows of the same seeded shuffle), so the
same rows form each batch: only their layout differs. Right-padded
rows pad every sequence to the batch's longest; packed rows lay the batch's sequences end to
end in rows of at most ``packing_length`` (default ``max_length``) tokens, positions restarting
per sequence and attention kept inside it. The LM head projects only the completion positions
in both. ``prefl_grouped`` (padded, ``group_by_length=True``) is there for context.

``--data hh`` (default): Anthropic HH rows in SmolLM2's chat template and a random-init
SmolLM2-width Llama, 10 layers (per token, forward: body 70.8 MFLOP, LM head 56.6 MFLOP), as in
:mod:`hh_data`; ``max_length`` 512, prompts of at most 256 tokens (longer rows left out).
``--data toy``: the toy rows and 4-layer model of the prefl-vs-TRL toy benchmarks. Each run is a
subprocess, variants rotate, the table reports medians (see :mod:`layout_report`)::

    python benchmarks/sft_packing.py [--steps 7 --batch 8 --repeats 3]
    python benchmarks/sft_packing.py --data toy --steps 40 --batch 16 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch
from hh_workers import finish_layout_worker, prefl_layout_data, prepare_layouts, variants
from layout_report import compare_variants
from trl_harness import StepClock, prefl_adamw, prefl_trainer
from trl_report import base_parser

META: dict[str, Any] = {
    "name": "sft_packing_hh",
    "unit": "rows",
    "title": "SFT on HH rows: prefl padded vs packed (SmolLM2 tokenizer, 10-layer Llama)",
    "matched": [
        "the same model, rows, seeded shuffle (so the same batches), lengths, AdamW, clipping "
        "and threads; only the layout of each batch differs",
    ],
}
TOY_META: dict[str, Any] = {
    **META,
    "name": "sft_packing_toy",
    "title": "SFT on toy rows: prefl padded vs packed (4-layer Llama, 32k words)",
}
VARIANTS = ["prefl_padded", "prefl_packed", "prefl_grouped"]
HH_DEFAULTS = {"steps": 7, "warmup": 1, "batch": 8, "max_length": 512, "max_prompt_length": 256}


def run_prefl(args: Any, clock: StepClock) -> Any:
    """``PreferenceDataModule(mode="sft")`` + ``SFTModule`` under a Lightning ``Trainer``."""
    from lightning.pytorch import seed_everything

    from prefl import SFTModule

    seed_everything(args.seed, verbose=False)
    data, counter = prefl_layout_data(args, "sft")
    module = SFTModule(
        str(args.workdir / "model"), optimizer=prefl_adamw(args.lr), lr_scheduler=None
    )
    prefl_trainer(args, clock).fit(module, datamodule=data)
    return counter


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Compare the layouts (or, with ``--worker``, run one and print its result)."""
    parser = base_parser(__doc__.split("\n")[0], steps=40, batch=16, lr=5e-5)
    parser.add_argument("--data", choices=("toy", "hh"), default="hh", help="HH or toy rows")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--layers", type=int, default=None, help="hh model layers (default 10)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data == "hh":
        parser.set_defaults(**HH_DEFAULTS)
        args = parser.parse_args(argv)
    if args.worker is None:
        meta = META if args.data == "hh" else TOY_META
        prepare = functools.partial(prepare_layouts, mode="sft")
        names = args.variants.split(",")
        return compare_variants(Path(__file__).resolve(), args, prepare, meta, variants(names))
    torch.set_num_threads(args.threads)
    clock = StepClock()
    finish_layout_worker(clock, args, run_prefl(args, clock))
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
