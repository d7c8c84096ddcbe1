"""The toy pipeline, prefl's main job: SFT → reward model → DPO, online DPO, KTO, PPO → evaluation.

``python -m prefl.toy --out DIR`` runs the toy configs (``configs/toy/*.yaml``) in order, inside
``DIR``: SFT on the toy corpus, a reward model on the oracle-labelled pairs, then DPO, online DPO
(pairs of its own samples, labelled by the oracle as it trains), KTO (the same pairs as DPO read
as unpaired rows) and PPO (against the learned reward model), all from the same SFT export. They
are then evaluated on the same held-out prompts against the SFT model
(:func:`prefl.generation.evaluate.evaluate` with the toy oracle): a table is printed,
``DIR/summary.json`` holds one entry per stage (``reward``, ``kl``, ``win_rate``,
``frontier_efficiency``...), and ``DIR/frontier.png`` plots oracle reward against KL, one point
per evaluated checkpoint, beside the exact optimum of ``E[r] − β·KL`` and best-of-n from the
generator (:mod:`prefl.tasks.toy_optimum`). ``--sweep`` adds DPO, online DPO and KTO runs over β
and PPO runs over the KL coefficient and draws their frontiers, as in the DPO paper's Fig. 2. It
needs a source checkout (for the configs).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "toy"
DPO_BETAS = (0.1, 0.25, 0.5, 1.0, 2.0)
KTO_BETAS = DPO_BETAS
ONLINE_DPO_BETAS = DPO_BETAS
PPO_KL_COEFS = (0.01, 0.05, 0.2, 0.5)
#: β grid of the exact optimal curve (log-spaced, 0.01 to 20) and best-of-n sizes
OPTIMUM_BETAS = tuple(0.01 * 2000 ** (i / 59) for i in range(60))
BEST_OF_N = (1, 2, 4, 8, 16, 32, 64, 128)


def fit_stage(config: str, extra: Sequence[str] = (), callbacks: Sequence[Any] = ()) -> Any:
    """Fit one toy config in-process (relative paths resolve in the current directory)."""
    from prefl.cli import build_cli

    path = CONFIGS / f"{config}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the toy pipeline needs a source checkout of "
            "prefl (pip install -e .)"
        )
    cli = build_cli(["-c", str(path), *extra], run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def evaluate_exports(exports: dict[str, str], num_samples: int = 8) -> dict[str, dict]:
    """Evaluate each export against the SFT export (``exports["sft"]``) with the toy oracle."""
    from prefl.data import load_tokenizer
    from prefl.generation.evaluate import evaluate
    from prefl.generation.sample import sample_completions
    from prefl.models import build_causal_lm
    from prefl.tasks import toy

    tokenizer = load_tokenizer(exports["sft"])
    reference = build_causal_lm(exports["sft"], tokenizer).eval()
    prompts = toy.split_prompts()[1]
    ref_samples = sample_completions(reference, tokenizer, prompts, 16, 1.0, num_samples, 128, 0)
    results = {}
    for stage, path in exports.items():
        policy = reference if stage == "sft" else build_causal_lm(path, tokenizer).eval()
        results[stage] = evaluate(
            policy,
            reference,
            tokenizer,
            prompts,
            toy.oracle_rewards,
            num_samples,
            reference_samples=ref_samples,
        )
    return results


def add_optimum(summary: dict[str, Any]) -> None:
    """The exact optimal curve and best-of-n (``summary["optimum"]``), and each evaluated
    point's ``frontier_efficiency`` = reward ÷ R*(the KL it paid) and ``gain_efficiency`` =
    (reward − R*(0)) ÷ (R*(KL) − R*(0)), the share of the reachable gain it got."""
    from prefl.tasks.toy_optimum import best_of_n, frontier_reward_at, optimal_frontier

    curve = optimal_frontier(OPTIMUM_BETAS)
    summary["optimum"] = {"frontier": curve, "best_of_n": best_of_n(BEST_OF_N)}
    base = frontier_reward_at(0.0, curve)
    points = [*summary["stages"].values()]
    points += [p for method in summary.get("sweep", {}).values() for p in method]
    for point in points:
        best = frontier_reward_at(max(point["kl"], 0.0), curve)
        point["optimal_reward"] = best
        point["frontier_efficiency"] = point["reward"] / best
        point["gain_efficiency"] = (point["reward"] - base) / (best - base) if best > base else 0.0


def plot_frontier(summary: dict[str, Any], path: Path) -> None:
    """Oracle reward against KL: SFT, each method's evaluated checkpoints, and sweep curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    stages = summary["stages"]

    def curve(points: list[dict[str, float]], style: str, **kwargs: Any) -> None:
        if points:
            ax.plot([p["kl"] for p in points], [p["reward"] for p in points], style, **kwargs)

    optimum = summary.get("optimum") or {}
    curve(
        optimum.get("frontier", []),
        "-",
        color="black",
        lw=1.5,
        label="optimum: max E[r] − β·KL (exact)",
    )
    bon_label = "best-of-n from the generator (KL bound)"
    curve(optimum.get("best_of_n", []), "x--", color="gray", label=bon_label)
    ax.scatter([0.0], [stages["sft"]["reward"]], color="black", zorder=3, label="SFT")
    colors = {
        "dpo": "tab:blue",
        "online_dpo": "tab:purple",
        "kto": "tab:green",
        "ppo": "tab:orange",
    }
    for method, color in colors.items():
        name = {"online_dpo": "online DPO"}.get(method, method.upper())
        points = summary["frontier"].get(method, [])
        curve(points, "o:", color=color, alpha=0.6, label=f"{name} during training")
        final = stages[method]
        ax.scatter(
            [final["kl"]],
            [final["reward"]],
            marker="*",
            s=180,
            color=color,
            zorder=4,
            label=f"{name} final",
        )
        sweep = sorted(summary.get("sweep", {}).get(method, []), key=lambda p: p["kl"])
        curve(sweep, "s-", color=color, label=f"{name} sweep")
    ax.set_xlim(left=-0.2, right=max(6.0, *(p["kl"] + 0.5 for p in stages.values())))
    ax.set_xlabel("KL(policy ‖ SFT), nats per completion")
    ax.set_ylabel("mean oracle reward (held-out prompts)")
    ax.set_title("Toy task: reward–KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(summary: dict[str, Any]) -> str:
    """The stage table: oracle reward, KL, win rate vs SFT, EOS rate and wall time."""
    rows = [
        f"{'stage':<10} {'oracle reward':>13} {'KL':>7} {'R*(KL)':>7} {'of R*':>6} "
        f"{'win vs SFT':>10} {'EOS rate':>8} {'wall s':>7}"
    ]
    for stage, r in summary["stages"].items():
        wall = summary["wall_seconds"].get(stage, float("nan"))
        best, eff = (
            r.get("optimal_reward", float("nan")),
            r.get("frontier_efficiency", float("nan")),
        )
        rows.append(
            f"{stage:<10} {r['reward']:>+13.3f} {r['kl']:>7.2f} {best:>+7.3f} {eff:>6.1%} "
            f"{r['win_rate']:>10.3f} {r['eos_rate']:>8.3f} {wall:>7.1f}"
        )
    entropy = summary.get("sft_entropy")
    if entropy:
        rows.append(
            f"SFT held-out NLL {entropy['model_nll']:.4f} nats/token vs the generator's "
            f"{entropy['generator_nll']:.4f} on the same rows (ratio {entropy['ratio']:.4f})"
        )
    rm = summary.get("reward_model")
    if rm:
        rows.append(
            f"reward model: held-out pair accuracy {rm['pair_accuracy']:.3f}, "
            f"Spearman with the oracle {rm['spearman']:.3f}"
        )
    table = "\n".join(rows)
    print(table, flush=True)
    return table


def frontier_points(history: list[tuple[int, dict]]) -> list[dict[str, float]]:
    """``[{step, kl, reward, win_rate}]`` from an :class:`~prefl.callbacks.EvalCallback`."""
    return [
        {"step": step, "kl": r["kl"], "reward": r["reward"], "win_rate": r["win_rate"]}
        for step, r in history
    ]


def run_sweep(summary: dict[str, Any]) -> None:
    """DPO, online DPO and KTO over β, PPO over the KL coefficient (no export, final
    evaluation only)."""
    from prefl.callbacks import EvalCallback

    quiet = [
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
    ]
    runs = [("dpo", "beta", value) for value in DPO_BETAS]
    runs += [("online_dpo", "beta", value) for value in ONLINE_DPO_BETAS]
    runs += [("kto", "beta", value) for value in KTO_BETAS]
    runs += [("ppo", "kl_coef", value) for value in PPO_KL_COEFS]
    summary["sweep"] = {"dpo": [], "online_dpo": [], "kto": [], "ppo": []}
    for method, key, value in runs:
        print(f"prefl toy sweep: {method} {key}={value}", flush=True)
        evaluation = EvalCallback(num_samples=4)
        fit_stage(method, [*quiet, f"--model.init_args.{key}", str(value)], [evaluation])
        point = frontier_points(evaluation.history)[-1]
        summary["sweep"][method].append({key: value, **point})


def run_pipeline(out: str | Path, sweep: bool = False) -> dict[str, Any]:
    """Run the whole toy pipeline in ``out`` and return the summary (also written to JSON)."""
    from prefl.callbacks import EntropyReport, EvalCallback, RewardReport

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(out)
    try:
        start = time.perf_counter()
        wall: dict[str, float] = {}
        evals = {
            "dpo": EvalCallback(every_n_steps=25),
            "online_dpo": EvalCallback(every_n_steps=20),
            "kto": EvalCallback(every_n_steps=25),
            "ppo": EvalCallback(every_n_steps=8),
        }
        summary: dict[str, Any] = {"frontier": {}, "wall_seconds": wall}
        for stage in ("sft", "reward", "dpo", "online_dpo", "kto", "ppo"):
            t0 = time.perf_counter()
            cli = fit_stage(stage, callbacks=[evals[stage]] if stage in evals else [])
            wall[stage] = time.perf_counter() - t0
            if stage == "reward":
                report = next(c for c in cli.trainer.callbacks if isinstance(c, RewardReport))
                summary["reward_model"] = report.results
            if stage == "sft":
                report = next(c for c in cli.trainer.callbacks if isinstance(c, EntropyReport))
                summary["sft_entropy"] = report.results
        for method, callback in evals.items():
            summary["frontier"][method] = frontier_points(callback.history)
        exports = {s: f"runs/toy/{s}/export" for s in ("sft", "dpo", "online_dpo", "kto", "ppo")}
        summary["stages"] = evaluate_exports(exports)
        if sweep:
            run_sweep(summary)
        add_optimum(summary)
        summary["total_seconds"] = time.perf_counter() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_frontier(summary, out / "frontier.png")
        print_table(summary)
        print(
            f"prefl toy: {summary['total_seconds']:.0f} s; wrote {out / 'summary.json'} and "
            f"{out / 'frontier.png'}",
            flush=True,
        )
        return summary
    finally:
        os.chdir(previous)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m prefl.toy --out DIR [--sweep]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/pipeline", help="output directory")
    parser.add_argument("--sweep", action="store_true", help="also sweep DPO, KTO and PPO β")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the toy models are too small to gain from more, and "
        "one thread avoids the slowdown of oversubscribed cores)",
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    run_pipeline(args.out, sweep=args.sweep)


if __name__ == "__main__":
    main()
