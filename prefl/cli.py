"""The ``prefl`` command.

- ``prefl fit|validate|test|predict -c configs/....yaml``: LightningCLI over prefl's modules and
  the PreferenceDataModule (:mod:`prefl.lightning_cli`; ``PreflCLI`` and ``build_cli`` are
  also importable from here).
- ``prefl pairs SAMPLES --out PAIRS.jsonl``: label sampled completions with a reward model, a
  reward function or a judge (:mod:`prefl.labelling.make`).
- ``prefl label SAMPLES --out PAIRS.jsonl``: label them by hand on a local web page
  (:mod:`prefl.labelling.server`, the ``label`` extra).

Everything is imported when it is needed, so that ``prefl pairs --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What ``prefl --help`` adds after LightningCLI's own help.
MORE_HELP = """
prefl also makes preference pairs from sampled completions (docs/make-pairs.md):
  prefl pairs SAMPLES --out PAIRS.jsonl   label them with --reward-model, --reward-fn or --judge
  prefl label SAMPLES --out PAIRS.jsonl   label them by hand on a local web page
(`prefl pairs --help`, `prefl label --help` for their options)"""


def __getattr__(name: str) -> Any:
    """``PreflCLI`` and ``build_cli``, from :mod:`prefl.lightning_cli` on first use."""
    if name in ("PreflCLI", "build_cli"):
        from prefl import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pairs_parser() -> argparse.ArgumentParser:
    """The options of ``prefl pairs``."""
    p = argparse.ArgumentParser(
        prog="prefl pairs",
        description="Label sampled completions and write preference pairs that "
        "PreferenceDataModule(mode='pairs') reads as they are. Ends with one line: prompts "
        "read, pairs written, ties, rows skipped by reason.",
    )
    p.add_argument("samples", nargs="+", help="samples JSONL files or folders (SampleWriter's)")
    p.add_argument("--out", required=True, help="the pairs file to write (JSONL)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--reward-model",
        metavar="PATH",
        help="a reward-model export (or any "
        "one-label sequence classifier), run in Lightning's predict loop",
    )
    who.add_argument(
        "--reward-fn",
        metavar="MODULE:FN",
        help="a reward function fn(prompts, completions) -> list[float], as PPO takes; or 'toy'",
    )
    who.add_argument(
        "--judge",
        metavar="PATH",
        help="a local chat model (folder or .gguf) "
        "asked which answer is better in both orders; kept when both agree",
    )
    p.add_argument(
        "--min-margin",
        type=float,
        default=None,
        help="every pair whose margin is at least this (default: best against worst only)",
    )
    p.add_argument(
        "--judge-template",
        metavar="FILE",
        help="the judge's instructions, a text "
        "with {prompt}, {first} and {second} (default: docs/make-pairs.md)",
    )
    p.add_argument(
        "--judge-labels",
        nargs=2,
        default=["A", "B"],
        metavar=("FIRST", "SECOND"),
        help="the answers the template asks the judge for (default: A B)",
    )
    p.add_argument(
        "--tokenizer",
        help="renders chat prompts for --reward-fn (default: the samples' meta model)",
    )
    p.add_argument(
        "--scores-out",
        metavar="PATH",
        help="also write the samples with each "
        "completion's score (prefl label asks about close pairs first)",
    )
    loop = p.add_argument_group("predict loop (--reward-model, --judge)")
    loop.add_argument("--batch-size", type=int, default=8, help="rows per batch and device")
    loop.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="most tokens per scored text (reward model: prompts cut from the left to half of "
        "it; default: the model's context, at most 1024)",
    )
    loop.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (Lightning's)")
    loop.add_argument("--devices", default="1", help="devices per node: data-parallel labelling")
    loop.add_argument("--num-nodes", type=int, default=1, help="nodes")
    loop.add_argument("--precision", default=None, help="e.g. bf16-mixed (default: Lightning's)")
    return p


def label_parser() -> argparse.ArgumentParser:
    """The options of ``prefl label``."""
    p = argparse.ArgumentParser(
        prog="prefl label",
        description="Serve a local page on which a person labels sampled completions, two at a "
        "time: keys left / right / tie / skip / undo. Every decision is on disk before the "
        "next item shows; a restart resumes at the first undecided item.",
    )
    p.add_argument("samples", nargs="+", help="samples JSONL files or folders (SampleWriter's)")
    p.add_argument("--out", required=True, help="the pairs file (JSONL); its journal is beside")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; any "
        "other needs the random token that the printed URL carries)",
    )
    p.add_argument("--port", type=int, default=8765, help="port (0 = any free one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the left/right order")
    p.add_argument(
        "--per-prompt",
        type=int,
        default=None,
        help="most comparisons per prompt (default: every pair of its completions)",
    )
    return p


def _devices(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def run_pairs(argv: Sequence[str]) -> None:
    """``prefl pairs``: parse ``argv`` and label (:func:`prefl.labelling.make.make_pairs`)."""
    a = pairs_parser().parse_args(argv)
    if a.reward_fn is not None and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # MODULE:FN from the working directory, as `python -m`
    from prefl.data.judging import JUDGE_TEMPLATE, check_template
    from prefl.labelling.make import make_pairs

    template = JUDGE_TEMPLATE
    if a.judge_template is not None:
        template = check_template(Path(a.judge_template).read_text(encoding="utf-8"))
    trainer: dict[str, Any] = {"accelerator": a.accelerator, "devices": _devices(a.devices)}
    trainer["num_nodes"] = a.num_nodes
    if a.precision is not None:
        trainer["precision"] = a.precision
    make_pairs(
        a.samples,
        a.out,
        reward_model=a.reward_model,
        reward_fn=a.reward_fn,
        judge=a.judge,
        min_margin=a.min_margin,
        judge_template=template,
        judge_labels=tuple(a.judge_labels),
        tokenizer=a.tokenizer,
        scores_out=a.scores_out,
        batch_size=a.batch_size,
        max_length=a.max_length,
        trainer_kwargs=trainer,
    )


def run_label(argv: Sequence[str]) -> None:
    """``prefl label``: parse ``argv``, then serve the page until Ctrl-C."""
    a = label_parser().parse_args(argv)
    from prefl.data.pairs import LabelCounts, read_samples
    from prefl.labelling.server import serve
    from prefl.labelling.store import LabelStore

    counts = LabelCounts()
    rows = read_samples(a.samples, counts)
    print(f"prefl label: {counts.prompts} prompts read, {counts.skipped_text()}", flush=True)
    store = LabelStore(rows, a.out, seed=a.seed, per_prompt=a.per_prompt)
    try:
        serve(store, a.host, a.port)
    finally:
        t = store.tally()
        store.close()
        print(
            f"prefl label: {t['decided']} of {t['total']} items decided: {t['left'] + t['right']}"
            f" pairs, {t['tie']} ties, {t['skip']} skipped -> {a.out}",
            flush=True,
        )


def main(args: list[str] | None = None) -> None:
    """The ``prefl`` command (``args`` default to ``sys.argv[1:]``); returns nothing, so the
    console script exits with status 0 on success."""
    argv = sys.argv[1:] if args is None else list(args)
    commands = {"pairs": run_pairs, "label": run_label}
    if argv and argv[0] in commands:
        try:
            commands[argv[0]](argv[1:])
        except (ValueError, FileNotFoundError) as err:  # bad input or settings: say what, where
            raise SystemExit(f"prefl {argv[0]}: error: {err}") from err
        return
    from prefl.lightning_cli import build_cli

    try:
        build_cli(args)
    except SystemExit:
        if not argv or argv[0] in ("-h", "--help"):
            print(MORE_HELP, file=sys.stdout if argv else sys.stderr)
        raise
