"""Shared harness of the prefl-vs-TRL benchmarks (``*_vs_trl.py``): one model, one data set, one
clock, one report.

What every comparison shares:

- **The model.** One random-init Llama (4 layers, hidden 256, intermediate 688, 4 heads, untied
  embeddings, no dropout: Llama's only dropout, ``attention_dropout``, is 0) saved with
  ``save_pretrained`` to a temporary directory, next to an offline word-level tokenizer of exactly
  32,000 tokens (the toy task's lexicon, distinct PAD/EOS/BOS/UNK, synthetic filler words up to the
  vocabulary size), built with the ``tokenizers`` library. Both libraries load model and tokenizer
  from that directory, in float32; nothing comes from the hub.
- **The data.** Rows of prefl's toy task (:mod:`prefl.tasks.toy`) written once to JSONL, which both
  sides read. Completions start with a space, because TRL joins ``prompt + completion`` as strings,
  so both tokenize to the same ids: ``<bos> prompt words completion words <eos>``.
- **The clock.** Each run is a subprocess (``--worker prefl|trl``) that records a timestamp at the
  end of every optimizer step (a Lightning ``Callback`` / a TRL ``TrainerCallback``). Throughput is
  ``batch × (steps − warmup) / (t[steps] − t[warmup])``: the first ``warmup`` steps are excluded,
  and the window includes everything between step ends (data loading, forward, backward, clipping,
  optimizer). Peak RSS is the worker's ``ru_maxrss`` as returned by ``os.wait4`` for that child.

:mod:`trl_report` runs the workers (libraries alternating) and writes the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

RESULT_PREFIX = "RESULT "
LIBRARIES = ("prefl", "trl")
VOCAB_SIZE = 32000
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}
#: AdamW as the HF Trainer builds it by default on torch >= 2.8 (``optim="adamw_torch_fused"``).
ADAMW: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "fused": True}
MAX_GRAD_NORM = 1.0


def toy_task() -> ModuleType:
    """prefl's toy task, :mod:`prefl.tasks.toy`: pure Python, so importing it brings in neither
    Lightning nor torch (``prefl/__init__.py`` loads its public names lazily), and the TRL
    workers pay no import time or memory for prefl."""
    return importlib.import_module("prefl.tasks.toy")


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """A word-level tokenizer of exactly ``vocab_size`` tokens: specials, toy lexicon, fillers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *toy_task().vocabulary()]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {word: i for i, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_model_dir(out_dir: Path, seed: int = 0) -> Path:
    """Save the random-init Llama and its 32k tokenizer to ``out_dir`` (float32, safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config).float()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def toy_pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` toy preference rows; completions get a leading space (see the module docstring)."""
    rows = toy_task().pair_rows(n, seed=seed)
    return [{**r, "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in rows]


def prepare_pairs(workdir: Path, args: argparse.Namespace) -> None:
    """The shared model directory and preference pairs (enough rows for every step)."""
    build_model_dir(workdir / "model", seed=args.seed)
    rows = toy_pair_rows(max(512, args.batch * (args.steps + 1)), seed=args.seed)
    write_jsonl(workdir / "pairs.jsonl", rows)


def toy_prompt_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` toy prompt rows (drawn with replacement from the training prompts)."""
    return toy_task().prompt_rows(n, seed=seed)


#: Words (= non-special tokens, the tokenizer being word-level) of every completion scored.
COMPLETION_WORDS: list[int] = []


def toy_oracle_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """The toy oracle (``oracle_rewards`` of ``prefl/tasks/toy.py``) in TRL's reward-function
    signature, also counting completion lengths; both libraries call this same function (prefl by
    its import path ``trl_harness:toy_oracle_reward``)."""
    COMPLETION_WORDS.extend(len(c.split()) for c in completions)
    return toy_task().oracle_rewards(prompts, completions)


def _rss_mib(field: str = "VmRSS") -> float:
    """This process's current (``VmRSS``) or peak (``VmHWM``) resident set size, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """Timestamps of optimizer-step ends, and what the model looked like when training began."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.rss: list[float] = []
        self.info: dict[str, Any] = {}

    def start(self, model: torch.nn.Module) -> None:
        """Record threads, dtype, attention implementation and RSS as training begins."""
        param = next(model.parameters())
        config = getattr(model, "config", None)
        self.info = {
            "torch_threads": torch.get_num_threads(),
            "dtype": str(param.dtype),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "rss_at_train_start_mib": _rss_mib(),
            "rss_anon_at_train_start_mib": _rss_mib("RssAnon"),
        }

    def tick(self) -> None:
        """Record the end of one optimizer step (wall clock and this process's CPU time)."""
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.rss.append(_rss_mib())


def lightning_clock(clock: StepClock) -> Any:
    """A Lightning ``Callback`` feeding ``clock`` (train start and every batch end)."""
    from lightning.pytorch import Callback

    class _LightningClock(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            clock.start(pl_module.model)

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    return _LightningClock()


def trl_clock(clock: StepClock) -> Any:
    """A ``transformers.TrainerCallback`` feeding ``clock`` (train begin and every step end)."""
    from transformers import TrainerCallback

    class _TrlClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start(kwargs["model"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.tick()

    return _TrlClock()


def trl_common_args(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """``TrainingArguments`` both TRL trainers get: fp32 on CPU, no logging/eval/saving, no
    gradient checkpointing, constant learning rate, the shared AdamW, clipping at 1."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch_fused",
        "adam_beta1": ADAMW["betas"][0],
        "adam_beta2": ADAMW["betas"][1],
        "adam_epsilon": ADAMW["eps"],
        "weight_decay": ADAMW["weight_decay"],
        "max_grad_norm": MAX_GRAD_NORM,
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": args.seed,
        "model_init_kwargs": {"dtype": "float32"},
    }


def prefl_adamw(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    """The same AdamW as :func:`trl_common_args` selects, as a prefl ``OptimizerCallable``."""

    def build(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, **ADAMW)

    return build


def prefl_data(args: argparse.Namespace, mode: str) -> Any:
    """prefl's ``PreferenceDataModule`` over the worker's JSONL file (``pairs.jsonl`` for
    ``pairs``, ``prompts.jsonl`` for ``prompts``), the benchmark's lengths, batch and seed."""
    from prefl import PreferenceDataModule

    return PreferenceDataModule(
        dataset=str(args.workdir / f"{mode}.jsonl"),
        tokenizer=str(args.workdir / "model"),
        mode=mode,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch,
        seed=args.seed,
        group_by_length=args.group_by_length,
    )


def prefl_trainer(args: argparse.Namespace, clock: StepClock, clip: bool = True) -> Any:
    """A Lightning ``Trainer``: CPU, fp32, ``max_steps``, no logger/checkpoints/progress bar/
    validation, gradient clipping at 1 (``clip=False`` for manual optimisation)."""
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=MAX_GRAD_NORM if clip else None,
        callbacks=[lightning_clock(clock)],
    )


def finish_worker(
    clock: StepClock,
    args: argparse.Namespace,
    samples_per_step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Print the worker's result line: throughput over the steps after the warmup, step times,
    the model facts recorded at train start and this process's peak RSS (plus ``extra``)."""
    ends = clock.ends
    if len(ends) <= args.warmup:
        raise RuntimeError(f"only {len(ends)} steps ran; need more than --warmup={args.warmup}")
    window = ends[-1] - ends[args.warmup - 1] if args.warmup else ends[-1] - ends[0]
    timed = len(ends) - args.warmup if args.warmup else len(ends) - 1
    step_times = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    cpu_times = [b - a for a, b in zip(clock.cpu, clock.cpu[1:], strict=False)]
    first = max(args.warmup - 1, 0)
    result = {
        "steps": len(ends),
        "timed_steps": timed,
        "samples_per_step": samples_per_step,
        "throughput": samples_per_step * timed / window,
        "step_times_s": step_times,
        "timed_step_times_s": step_times[first:],
        "timed_step_cpu_s": cpu_times[first:],
        "self_peak_rss_mib": _rss_mib("VmHWM"),
        "rss_after_each_step_mib": clock.rss,
        "rss_at_end_mib": {f: _rss_mib(f) for f in ("VmRSS", "RssAnon", "RssFile")},
        **clock.info,
        "imported": {name: name in sys.modules for name in ("prefl", "lightning", "trl")},
    }
    if COMPLETION_WORDS:
        result["completions_scored"] = len(COMPLETION_WORDS)
        result["mean_completion_words"] = sum(COMPLETION_WORDS) / len(COMPLETION_WORDS)
    result.update(extra or {})
    print(RESULT_PREFIX + json.dumps(result), flush=True)
