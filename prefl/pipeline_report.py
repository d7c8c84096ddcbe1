"""The main job's report: each stage scored against the exact optimum, the frontier plot and the
stage table (:mod:`prefl.pipeline` runs the stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: per process: (SFT export, its weights' mtime, samples) -> (tokenizer, SFT model, prompts,
#: the SFT model's samples), the reference of every evaluation
_REFERENCE: dict[tuple[str, float, int], tuple[Any, Any, list[str], Any]] = {}

#: β grid of the exact optimal curve (log-spaced, 0.01 to 20) and best-of-n sizes
OPTIMUM_BETAS = tuple(0.01 * 2000 ** (i / 59) for i in range(60))
BEST_OF_N = (1, 2, 4, 8, 16, 32, 64, 128)


def reference_context(sft_export: str, num_samples: int) -> tuple[Any, Any, list[str], Any]:
    """The tokenizer, the SFT model, the held-out prompts and the SFT model's samples for them
    (seed 0), built once per process and SFT export."""
    from prefl.data import load_tokenizer
    from prefl.generation.sample import sample_completions
    from prefl.models import build_causal_lm
    from prefl.tasks import toy

    path = Path(sft_export).resolve()
    weights = path / "model.safetensors"
    key = (str(path), weights.stat().st_mtime if weights.exists() else 0.0, num_samples)
    if key not in _REFERENCE:
        tokenizer = load_tokenizer(str(path))
        reference = build_causal_lm(str(path), tokenizer).eval()
        prompts = toy.split_prompts()[1]
        samples = sample_completions(reference, tokenizer, prompts, 16, 1.0, num_samples, 128, 0)
        _REFERENCE[key] = (tokenizer, reference, prompts, samples)
    return _REFERENCE[key]


def evaluate_export(path: str, sft_export: str, num_samples: int = 8) -> dict[str, float]:
    """Evaluate one export against the SFT export with the toy oracle (held-out prompts, the
    same SFT samples for every export): oracle reward, KL, win rate, EOS rate..."""
    from prefl.generation.evaluate import evaluate
    from prefl.models import build_causal_lm
    from prefl.tasks import toy

    tokenizer, reference, prompts, ref_samples = reference_context(sft_export, num_samples)
    same = Path(path).resolve() == Path(sft_export).resolve()
    policy = reference if same else build_causal_lm(path, tokenizer).eval()
    return evaluate(
        policy,
        reference,
        tokenizer,
        prompts,
        toy.oracle_rewards,
        num_samples,
        reference_samples=ref_samples,
    )


def evaluate_exports(exports: dict[str, str], num_samples: int = 8) -> dict[str, dict]:
    """Evaluate each export against the SFT export (``exports["sft"]``) with the toy oracle."""
    return {s: evaluate_export(p, exports["sft"], num_samples) for s, p in exports.items()}


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
