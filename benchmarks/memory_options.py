"""Peak memory of prefl's memory options for DPO and PPO, one option per run, mid-size model.

Setup (a temporary directory): a random-init Llama (8 layers, hidden 512, MLP 1408, 8 heads,
untied 32k embeddings; its parameter count is printed), the offline 32k word-level tokenizer of
:mod:`gpu_check_parts`, a reward-model export of the same backbone, and synthetic rows (150-word
filler prompts, 40-50-word toy-word completions: ~200 tokens, so activations and logits matter).
Each entry of :data:`CONFIGS` trains ``--steps`` AdamW steps (2 pairs or prompts each) under a
Lightning ``Trainer``: DPO fp32 with a live reference copy (baseline) and with one memory option
each, the naive log-prob path (``prefl.functional.selected.token_logps`` monkeypatched to
``log_softmax(logits.float()).gather``), fp32 and bf16-mixed, gradients set to None right after
each step (a callback, not a prefl option), and PPO (RLOO, k=2, 24 new tokens, the reward-model
export) with and without ``offload_frozen``.

Measurement: each run is a subprocess (``--child NAME``) with glibc's mmap threshold at 1 MiB, so
freed tensors return to the OS and RSS tracks live memory. It records the RSS just before ``fit``
(imports, tokenizer, data; no model yet), the peak RSS (``ru_maxrss``) overall and after each
step, the fastest step after the first (wall and CPU seconds: on a shared machine the fastest is
the least disturbed, and with one thread CPU seconds barely depend on the load), evidence that
the option was in effect, and on CUDA ``torch.cuda.max_memory_allocated``. The peak comes in
step 2 (Adam state exists from step 1 on); step 3 repeats it and gives a second timing. On a
CPU-only machine ``offload_frozen`` cannot lower RSS (it moves models *to* the CPU): it targets
GPU memory, which ``--device cuda`` measures.

    python benchmarks/memory_options.py [--steps 3 --repeats 1 --threads 1 --device cpu]
    python benchmarks/memory_options.py --tiny --configs dpo_baseline dpo_lora   # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import torch
import transformers
from gpu_check_parts import build_tokenizer
from lightning.pytorch import Callback, Trainer, seed_everything
from transformers import LlamaConfig, LlamaForCausalLM

import prefl.functional.selected
from prefl import CausalLMSpec, DPOModule, PPOModule, PreferenceDataModule
from prefl.data import load_tokenizer
from prefl.models import LoraSpec, is_lora
from prefl.models.reward import RewardModel, build_reward_model
from prefl.tasks import toy

RESULT_PREFIX = "RESULT "
SIZES: dict[str, dict[str, int]] = {
    "full": {"layers": 8, "hidden": 512, "mlp": 1408, "heads": 8, "vocab": 32000,
             "prompt_words": 150, "completion_words": 50, "max_length": 208},
    "tiny": {"layers": 2, "hidden": 64, "mlp": 256, "heads": 4, "vocab": 2048,
             "prompt_words": 24, "completion_words": 8, "max_length": 40},
}  # fmt: skip
#: name -> (stage, option flags applied by ``build``, what changes against the stage's baseline)
CONFIGS: dict[str, tuple[str, frozenset[str], str]] = {
    "dpo_baseline": ("dpo", frozenset(), "fp32, full fine-tune, live reference copy"),
    "dpo_precompute_ref": ("dpo", frozenset({"precompute"}), "precompute_ref_logps=True"),
    "dpo_grad_ckpt": ("dpo", frozenset({"ckpt"}), "CausalLMSpec(gradient_checkpointing=True)"),
    "dpo_lora": ("dpo", frozenset({"lora"}), "LoRA r=16 all-linear, reference = no adapters"),
    "dpo_bf16_mixed": ("dpo", frozenset({"bf16"}), 'Trainer(precision="bf16-mixed")'),
    "dpo_naive_logps": ("dpo", frozenset({"naive"}), "naive log_softmax path, not chunked"),
    "dpo_bf16_naive_logps": ("dpo", frozenset({"bf16", "naive"}), "bf16-mixed + naive path"),
    "ppo_baseline": ("ppo", frozenset(), "RLOO k=2, reward-model export, all models on device"),
    "ppo_offload_frozen": ("ppo", frozenset({"offload"}), "offload_frozen=True"),
}  # fmt: skip
BATCH, LR = 2, 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (peak: 2nd)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU s is steady)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tiny", action="store_true", help="2-layer, 64-wide model, short rows")
    p.add_argument("--json", default="benchmarks/results/memory_options.json")
    p.add_argument("--child", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


def prepare(workdir: Path, size: dict[str, int], n_rows: int) -> int:
    """Save the policy, a reward-model export and the JSONL rows; return the parameter count."""
    tokenizer = build_tokenizer(size["vocab"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size["hidden"], intermediate_size=size["mlp"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"], max_position_embeddings=2 * size["max_length"],
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(workdir / "model", safe_serialization=True)
    tokenizer.save_pretrained(workdir / "model")
    tok = load_tokenizer(str(workdir / "model"))  # what the data module and modules will load
    if tok.pad_token_id == tok.eos_token_id or tok.bos_token_id is None:
        raise RuntimeError("the saved tokenizer lost its distinct PAD/EOS/BOS")
    reward = build_reward_model(str(workdir / "model"), tok)
    RewardModel(reward, tok, {"mean": 0.0, "std": 1.0}).save_pretrained(workdir / "reward")
    rng, fillers = random.Random(0), size["vocab"] - len(toy.vocabulary()) - 8
    good, bad = [*toy.POSITIVE, *toy.NEUTRAL], [*toy.NEGATIVE, *toy.NEUTRAL]
    rows = []
    for _ in range(n_rows):
        n = rng.randint(size["completion_words"] * 4 // 5, size["completion_words"])
        rows.append({
            "prompt": " ".join(f"w{rng.randrange(fillers)}" for _ in range(size["prompt_words"])),
            "chosen": " ".join(rng.choice(good) for _ in range(n)),
            "rejected": " ".join(rng.choice(bad) for _ in range(n)),
        })  # fmt: skip
    (workdir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sum(p.numel() for p in model.parameters())


def naive_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """The naive path: a full ``(B, T, V)`` float32 log-softmax, kept alive for backward."""
    naive_token_logps.calls += 1
    logps = torch.log_softmax(logits.float(), dim=-1)
    safe = labels.clamp(0, logits.shape[-1] - 1)
    return logps.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask


naive_token_logps.calls = 0


class StepProbe(Callback):
    """Per training step: wall seconds, CPU seconds of this process (all threads; steadier than
    wall time on a shared machine) and the peak RSS so far (MiB), also once when training starts."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.peaks = [float("nan")]
        self._start = (0.0, 0.0)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.peaks[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
        self.steps.append({"wall_s": wall, "cpu_s": cpu})
        self.peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def build(name: str, workdir: Path, settings: dict[str, Any]) -> tuple[Any, Any, dict]:
    """The data module, the module and the ``Trainer`` arguments of configuration ``name``."""
    (stage, flags, _), model_dir, size = CONFIGS[name], str(workdir / "model"), settings["size"]
    data = PreferenceDataModule(
        dataset=str(workdir / "rows.jsonl"), tokenizer=model_dir,
        mode="pairs" if stage == "dpo" else "prompts", max_length=size["max_length"],
        max_prompt_length=size["prompt_words"] + 1, batch_size=BATCH, error_on_drop=True,
    )  # fmt: skip
    spec = CausalLMSpec(
        name_or_path=model_dir,
        gradient_checkpointing="ckpt" in flags,
        lora=LoraSpec(r=16, alpha=32) if "lora" in flags else None,
    )
    optimizer = functools.partial(torch.optim.AdamW, lr=LR)
    trainer_args: dict[str, Any] = {"precision": "bf16-mixed" if "bf16" in flags else "32-true"}
    if stage == "dpo":
        if "naive" in flags:
            prefl.functional.selected.token_logps = naive_token_logps  # what DPO log-probs call
        module = DPOModule(
            spec, optimizer=optimizer, lr_scheduler=None,
            precompute_ref_logps="precompute" in flags,
        )  # fmt: skip
        trainer_args["gradient_clip_val"] = 1.0
    else:
        module = PPOModule(
            spec, reward_model=str(workdir / "reward"), advantage_estimator="rloo",
            num_samples=2, max_new_tokens=24 if settings["size_name"] == "full" else 8,
            ppo_epochs=1, log_samples_every=0, optimizer=optimizer,
            offload_frozen="offload" in flags,
        )  # fmt: skip
    trainer_args["callbacks"] = [StepProbe()]
    return data, module, trainer_args


def option_checks(name: str, module: Any, data: Any, trainer: Trainer) -> dict[str, Any]:
    """Evidence, read after ``fit``, that the configuration's options were in effect."""
    checks: dict[str, Any] = {
        "reference_copy": module.reference is not None,
        "lora": is_lora(module.model),
        "trainable_params": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "precision": str(trainer.precision),
        "gradient_checkpointing": bool(getattr(module.model, "is_activation_checkpointing", False)),
        "naive_logps_calls": naive_token_logps.calls,
    }
    if CONFIGS[name][0] == "dpo":
        checks["ref_logps_columns"] = "ref_chosen_logps" in data.datasets["train"].column_names
    else:
        frozen = module.offloadable_models()
        checks["frozen_devices"] = sorted({str(next(m.parameters()).device) for m in frozen})
    return checks


def run_child(name: str, workdir: Path) -> dict[str, Any]:
    """Train configuration ``name`` for a few steps; return its memory and time numbers."""
    settings = json.loads((workdir / "settings.json").read_text())
    torch.set_num_threads(settings["threads"])
    seed_everything(0, verbose=False)
    cuda = settings["device"] == "cuda"
    data, module, trainer_args = build(name, workdir, settings)
    trainer = Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=settings["steps"],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **trainer_args,
    )  # fmt: skip
    (probe,) = trainer_args["callbacks"]
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")
    before /= 2**20  # RSS now, MiB
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    later = probe.steps[1:] or probe.steps  # the first step allocates the optimizer state
    metric = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("ppo/kl"))
    return {
        "config": name,
        "steps": len(probe.steps),
        "rss_before_fit_mib": before,
        "peak_rss_mib": peak,
        "delta_rss_mib": peak - before,
        "peak_rss_at_start_and_steps_mib": probe.peaks,
        "step_s": min(s["wall_s"] for s in later),
        "step_cpu_s": min(s["cpu_s"] for s in later),
        "step_times": probe.steps,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "last_metric": None if metric is None else float(metric),
        "checks": option_checks(name, module, data, trainer),
    }


def spawn(name: str, workdir: Path) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess and parse its result line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--workdir", str(workdir)]
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20), **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"config": name, "error": " | ".join(tail)}
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def summarize(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Median memory (fastest step) of each configuration's runs; ratios to its stage's baseline."""
    rows: dict[str, dict[str, Any]] = {}
    keys = ("rss_before_fit_mib", "peak_rss_mib", "delta_rss_mib", "step_s", "step_cpu_s")
    keys += ("cuda_peak_mib",)
    for name in names:
        ok = [r for r in runs if r["config"] == name and "error" not in r]
        if not ok:
            rows[name] = next(r for r in runs if r["config"] == name)
            continue
        med = {k: None if ok[0][k] is None else statistics.median(r[k] for r in ok) for k in keys}
        for k in ("step_s", "step_cpu_s"):  # timing: the least disturbed run
            med[k] = min(r[k] for r in ok)
        rows[name] = {"config": name, "runs": len(ok), **med, "checks": ok[-1]["checks"]}
    for name, row in rows.items():
        base = rows.get(f"{CONFIGS[name][0]}_baseline", {})
        for key, ratio in (("delta_rss_mib", "delta_x_base"), ("cuda_peak_mib", "cuda_x_base")):
            if row.get(key) is not None and base.get(key):
                row[ratio] = row[key] / base[key]
    return list(rows.values())


def table(rows: list[dict[str, Any]], cuda: bool) -> str:
    """The markdown table of the summary."""
    head = "| configuration | peak RSS MiB | Δ vs before fit MiB | Δ × baseline | step s | CPU s |"
    head += " CUDA peak MiB | CUDA × baseline |" * cuda + " what changes |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        note = CONFIGS[r["config"]][2]
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][:120]} |")
            continue
        cells = [r["config"], f"{r['peak_rss_mib']:.0f}", f"{r['delta_rss_mib']:.0f}",
                 f"{r.get('delta_x_base', float('nan')):.2f}", f"{r['step_s']:.2f}",
                 f"{r['step_cpu_s']:.2f}"]  # fmt: skip
        if cuda:
            cells += [f"{r['cuda_peak_mib']:.0f}", f"{r.get('cuda_x_base', float('nan')):.2f}"]
        if r["config"] == "ppo_offload_frozen" and not cuda:
            note += " (CPU-only run: cannot lower RSS; the option targets GPU memory)"
        lines.append("| " + " | ".join([*cells, note]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(run_child(args.child, args.workdir)), flush=True)
        return {}
    size_name = "tiny" if args.tiny else "full"
    settings = {"size_name": size_name, "size": SIZES[size_name], "steps": args.steps,
                "threads": args.threads, "device": args.device}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="prefl_memory_") as tmp:
        workdir = Path(tmp)
        n_params = prepare(workdir, SIZES[size_name], n_rows=BATCH * args.steps)
        (workdir / "settings.json").write_text(json.dumps(settings))
        print(f"model: {n_params / 1e6:.1f}M parameters ({size_name}), batch {BATCH}", flush=True)
        runs = []
        for repeat in range(args.repeats):
            for name in args.configs:
                runs.append({**spawn(name, workdir), "repeat": repeat})
                r = runs[-1]
                status = r.get("error") or f"peak {r['peak_rss_mib']:.0f} MiB, {r['step_s']:.2f} s"
                print(f"  {name} #{repeat}: {status}", flush=True)
    rows = summarize(runs, args.configs)
    cuda = args.device == "cuda"
    print(table(rows, cuda))
    meta = {
        **settings, "batch": BATCH, "lr": LR, "repeats": args.repeats, "params": n_params,
        "torch": torch.__version__, "lightning": lightning.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
    }  # fmt: skip
    report = {"config": meta, "summary": rows, "runs": runs}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
