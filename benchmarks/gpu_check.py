"""One-GPU check of DPO, the reward model and PPO under FSDP2 (ModelParallelStrategy), bf16.

Why: the toy pipeline proves the methods on a CPU; this proves the GPU path a cluster run takes
(Lightning's ``ModelParallelStrategy`` with ``data_parallel_size=1``, whose ``configure_model``
hook is where prefl applies ``fully_shard``) on a ~0.5B-parameter random-init Llama, and measures
what it costs: tokens/s, peak GPU memory and model FLOPs utilisation (MFU) per stage.

Model: Llama, hidden 1024, 24 layers, MLP 4096, 16 heads, untied 32k embeddings: 468M
parameters, 435M outside the input embeddings (both printed). Tokenizer: an offline word-level
vocabulary of 32k (the toy task's words plus fillers). Data: the toy task's rows joined until
each nearly fills ``--seq`` tokens.

Counting: *tokens* are every position of the training batches (chosen and rejected both for
pairs); "incl. padding" counts padded positions, "excl. padding" only attention-mask ones. MFU
uses ``N`` = parameters minus the input embeddings (attention-score FLOPs are left out, so MFU is
a slight underestimate) and the padded token rate: DPO 8N per token (policy forward+backward 6N,
reference forward 2N); reward model 6N; PPO update 6N, generation 2N per prompt or generated
token (prefill + decode), scoring 4N per token (policy and reference forwards). PPO uses the
critic-free RLOO estimator with the toy oracle as the reward function.

    python benchmarks/gpu_check.py                       # one CUDA GPU, < 5 min on an H100
    python benchmarks/gpu_check.py --device cpu --tiny   # CPU smoke run (2 layers, no MFU)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from gpu_check_parts import StepTimer, build_tokenizer, long_rows, matmul_params, time_ppo_phases
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from prefl import CausalLMSpec, DPOModule, PPOModule, PreferenceDataModule, RewardModule

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
# dense bf16 FLOP/s, first match in the device name wins (PCIe before SXM)
MFU_COUNTS = {
    "dpo": "MFU counts 8N FLOPs per token: policy forward+backward (6N) + reference forward (2N)",
    "reward": "MFU counts 6N FLOPs per token (forward+backward)",
    "ppo": "MFU counts per token of prompt+response: generation 2N (prefill and decode), scoring "
    "4N (policy and reference forwards), update 6N per PPO epoch; whole step = the sum",
}
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="training batches per stage")
    p.add_argument("--warmup", type=int, default=2, help="first batches left out of the rates")
    p.add_argument("--batch", type=int, default=8, help="pairs (DPO, reward) or prompts (PPO)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + answer)")
    p.add_argument("--gen", type=int, default=128, help="PPO: tokens generated per response")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--precision", default="bf16-true", choices=("bf16-true", "bf16-mixed"))
    p.add_argument("--stages", default="dpo,reward,ppo")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer, 64-wide model (smoke runs)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s of the GPU")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_check.json")
    return p.parse_args(argv)


def model_spec(args: argparse.Namespace) -> CausalLMSpec:
    shape = TINY if args.tiny else MODEL
    attn = "sdpa" if args.device == "cuda" else "eager"
    config = {
        "model_type": "llama",
        **shape,
        "tie_word_embeddings": False,
        "max_position_embeddings": max(4096, args.seq + args.gen),
    }
    return CausalLMSpec(config=config, attn_implementation=attn)


def peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_flops or args.device != "cuda":
        return args.peak_flops
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def trainer(args: argparse.Namespace, callbacks: list) -> Trainer:
    return Trainer(
        accelerator=args.device,
        devices=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        precision=args.precision,
        max_epochs=1,
        limit_train_batches=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def data(args, tokenizer, mode: str) -> PreferenceDataModule:
    """Long toy rows; prompts get half the sequence (pairs) or all but ``--gen`` (PPO)."""
    budget = args.seq // 2 - 1 if mode == "pairs" else args.seq - args.gen - 1
    rows = long_rows(mode, args.steps * args.batch, budget, args.seq)
    # a JSONL file, not Dataset.from_list: the latter's fingerprint pickles pyarrow types, which
    # failed on the GPU machine (datasets 5.2, pyarrow 26, Python 3.12)
    path = Path(tempfile.mkdtemp(prefix="prefl_gpu_check_")) / f"{mode}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return PreferenceDataModule(
        dataset=str(path),
        tokenizer=tokenizer,
        mode=mode,
        max_length=args.seq if mode == "pairs" else args.seq - args.gen,
        max_prompt_length=budget + 1,
        batch_size=args.batch,
    )


def rates(steps: list[dict], warmup: int, seconds: str, padded: str, real: str) -> dict:
    kept = steps[warmup:] or steps
    total = sum(s[seconds] for s in kept)
    return {
        "seconds_per_step": total / len(kept),
        "tokens_per_s_incl_padding": sum(s[padded] for s in kept) / total,
        "tokens_per_s_excl_padding": sum(s[real] for s in kept) / total if real else None,
        "steps_measured": len(kept),
    }


def run_stage(stage: str, args, tokenizer, spec) -> dict:
    seed_everything(0)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-6)  # noqa: E731
    if stage == "dpo":
        module = DPOModule(spec, tokenizer=tokenizer, beta=0.1, optimizer=optimizer)
    elif stage == "reward":
        module = RewardModule(spec, tokenizer=tokenizer, optimizer=optimizer)
    else:
        module = PPOModule(
            spec,
            tokenizer=tokenizer,
            reward_fns=["toy"],
            optimizer=optimizer,
            advantage_estimator="rloo",
            num_samples=2,
            max_new_tokens=args.gen,
            ppo_epochs=2,
            mini_batch_size=args.batch,
            log_samples_every=0,
        )
    timer, ppo_log = StepTimer(), []
    cuda = args.device == "cuda"
    if cuda:  # what earlier stages left allocated is reported, and is part of the peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2**30 if cuda else None
    start = time.perf_counter()
    run = trainer(args, [timer])
    with time_ppo_phases(module, ppo_log) if stage == "ppo" else nullcontext():
        run.fit(module, datamodule=data(args, tokenizer, "prompts" if stage == "ppo" else "pairs"))
    n = matmul_params(module.model)
    out: dict = {
        "total_params": sum(p.numel() for p in module.model.parameters()),
        "matmul_params": n,
        "fully_sharded": any(isinstance(p, DTensor) for p in module.model.parameters()),
        "param_dtype": str(next(module.model.parameters()).dtype).replace("torch.", ""),
        "wall_seconds": time.perf_counter() - start,
        "memory_at_start_gib": baseline,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "mfu_counts": MFU_COUNTS[stage],
    }
    peak = peak_flops(args)
    mfu = lambda flops, seconds: flops / seconds / peak if peak else None  # noqa: E731
    if stage != "ppo":
        r = rates(timer.steps, args.warmup, "seconds", "tokens_padded", "tokens")
        factor = 8 if stage == "dpo" else 6
        r["mfu"] = mfu(factor * n * r["tokens_per_s_incl_padding"], 1.0)
        out["phases"] = {"train step": r}
        return out
    w, epochs = args.warmup, module.ppo_epochs
    for s in ppo_log:
        s["update_padded"], s["update_real"] = epochs * s["sequence_padded"], epochs * s["sequence"]
        s["step"] = s["rollout"] + s["update"]
    kept = ppo_log[w:] or ppo_log
    total = lambda key: sum(s[key] for s in kept)  # noqa: E731
    gen = rates(ppo_log, w, "generation", "generated_padded", "generated")
    gen["mfu"] = mfu(2 * n * total("sequence_padded"), total("generation"))
    score = rates(ppo_log, w, "scoring", "sequence_padded", "sequence")
    score["mfu"] = mfu(4 * n * total("sequence_padded"), total("scoring"))
    upd = rates(ppo_log, w, "update", "update_padded", "update_real")
    upd["mfu"] = mfu(6 * n * total("update_padded"), total("update"))
    whole = rates(ppo_log, w, "step", "sequence_padded", "sequence")
    whole["mfu"] = mfu((6 + 6 * epochs) * n * total("sequence_padded"), total("step"))
    out["phases"] = {"generation": gen, "scoring": score, "update": upd, "whole step": whole}
    return out


def table(stage: str, result: dict) -> str:
    mem = result["peak_memory_gib"]
    head = (
        f"### {stage}: {result['total_params'] / 1e6:.1f}M parameters "
        f"({result['matmul_params'] / 1e6:.1f}M in matmuls), "
        f"{result['param_dtype']} weights, fully_shard applied: {result['fully_sharded']}, "
        f"peak memory {'n/a' if mem is None else f'{mem:.2f} GiB'}"
        + ("" if mem is None else f" ({result['memory_at_start_gib']:.2f} GiB at start)")
    )
    lines = [
        head,
        "",
        "| phase | s/step | tokens/s incl. padding | tokens/s excl. padding | MFU |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["phases"].items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {name} | {r['seconds_per_step']:.3f} | "
            f"{r['tokens_per_s_incl_padding']:,.0f} | "
            f"{r['tokens_per_s_excl_padding']:,.0f} | {mfu} |"
        )
    lines += ["", result["mfu_counts"] + "; N excludes the input embeddings."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --device cpu --tiny for a smoke run")
    if args.tiny:
        args.vocab = min(args.vocab, 2048)
    tokenizer, spec = build_tokenizer(args.vocab), model_spec(args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "strategy": "ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)",
        "peak_flops": peak_flops(args),
        "settings": settings,
        "stages": {},
    }
    print(
        f"gpu_check on {report['device']}: {args.precision}, vocab {len(tokenizer)}, "
        f"batch {args.batch}, seq {args.seq}, {args.steps} steps per stage, peak "
        + (f"{report['peak_flops'] / 1e12:.0f} TFLOP/s" if report["peak_flops"] else "unknown")
    )
    for stage in args.stages.split(","):
        result = run_stage(stage, args, tokenizer, spec)
        report["stages"][stage] = result
        print(table(stage, result), flush=True)
        gc.collect()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
