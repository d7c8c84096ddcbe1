"""The toy pipeline, prefl's main job: SFT → reward model → DPO, online DPO, KTO, PPO → evaluation.

``python -m prefl.toy --out DIR`` runs the toy configs (``configs/toy/*.yaml``) inside ``DIR``:
SFT on the toy corpus, a reward model on the oracle-labelled pairs, then DPO, online DPO (pairs of
its own samples, labelled by the oracle as it trains), KTO (the same pairs as DPO read as
unpaired rows) and PPO (against the learned reward model), all from the same SFT export. After
SFT the stages run side by side in worker processes (``--workers``; one per free core, at most
2, see :mod:`prefl.pipeline_workers`), each logged to ``runs/toy/<stage>.log``. They are then
evaluated on the same held-out prompts against the SFT model
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
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any

from prefl.pipeline_report import (
    add_optimum,
    evaluate_export,
    plot_frontier,
    print_table,
)
from prefl.pipeline_workers import (
    default_workers,
    enter_worker,
    output_to,
    worker_pool,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "toy"
DPO_BETAS = (0.1, 0.25, 0.5, 1.0, 2.0)
KTO_BETAS = DPO_BETAS
ONLINE_DPO_BETAS = DPO_BETAS
PPO_KL_COEFS = (0.01, 0.05, 0.2, 0.5)
STAGES = ("sft", "reward", "dpo", "online_dpo", "kto", "ppo")
#: the stages after SFT in the order that free workers take them (longest first, so that the two
#: workers end together on 2 cores: KTO beside the reward model, then DPO, then PPO)
ORDER = ("reward", "kto", "dpo", "ppo", "online_dpo")
#: the stage each stage starts from (default: SFT's export)
NEEDS = {"ppo": "reward"}
#: steps between the evaluations that make each method's frontier points
EVAL_EVERY = {"dpo": 25, "online_dpo": 20, "kto": 25, "ppo": 8}
EVALUATED = ("sft", "dpo", "online_dpo", "kto", "ppo")


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


def frontier_points(history: list[tuple[int, dict]]) -> list[dict[str, float]]:
    """``[{step, kl, reward, win_rate}]`` from an :class:`~prefl.callbacks.EvalCallback`."""
    return [
        {"step": step, "kl": r["kl"], "reward": r["reward"], "win_rate": r["win_rate"]}
        for step, r in history
    ]


def stage_result(stage: str, cli: Any, evaluation: Any, seconds: float) -> dict[str, Any]:
    """What the summary keeps of a fitted stage: its wall seconds, the frontier points of its
    :class:`~prefl.callbacks.EvalCallback` and the SFT / reward-model reports."""
    from prefl.callbacks import EntropyReport, RewardReport

    result: dict[str, Any] = {"wall": seconds}
    if evaluation is not None:
        result["frontier"] = frontier_points(evaluation.history)
    for callback in cli.trainer.callbacks:
        if isinstance(callback, RewardReport):
            result["reward_model"] = callback.results
        if isinstance(callback, EntropyReport):
            result["sft_entropy"] = callback.results
    return result


def run_stage(stage: str, log: Path | None = None) -> dict[str, Any]:
    """Fit one stage of the main job in the current directory (see :func:`stage_result`); with
    ``log``, its whole output goes to that file, without a progress bar."""
    from prefl.callbacks import EvalCallback

    every = EVAL_EVERY.get(stage)
    evaluation = EvalCallback(every_n_steps=every) if every else None
    callbacks = [evaluation] if evaluation else []
    start = time.perf_counter()
    if log is None:
        cli = fit_stage(stage, callbacks=callbacks)
    else:
        with output_to(log):
            cli = fit_stage(stage, ["--trainer.enable_progress_bar=false"], callbacks)
    return stage_result(stage, cli, evaluation, time.perf_counter() - start)


def stage_task(out: str, threads: int, stage: str) -> dict[str, Any]:
    """A worker's task: fit ``stage`` inside ``out`` (logged to ``runs/toy/<stage>.log``) and
    evaluate its export (``"sft"``: the evaluation of the SFT export alone)."""
    enter_worker(out, threads)
    result = {} if stage == "sft" else run_stage(stage, stage_log(stage))
    if stage in EVALUATED:
        result["evaluation"] = evaluate_export(export_of(stage), export_of("sft"))
    return result


def export_of(stage: str) -> str:
    """A stage's export directory (relative to the output directory)."""
    return f"runs/toy/{stage}/export"


def stage_log(stage: str) -> Path:
    """Where a stage run in a worker writes its output (relative to the output directory)."""
    return Path("runs/toy") / f"{stage}.log"


def next_ready(pending: list[str], done: dict[str, Any]) -> str | None:
    """The first stage of ``pending`` whose :data:`NEEDS` are ``done``, taken out of it."""
    for stage in pending:
        if NEEDS.get(stage, "sft") in done:
            pending.remove(stage)
            return stage
    return None


def run_stages(pool: Any, workers: int, out: Path, threads: int) -> dict[str, dict[str, Any]]:
    """Every stage after SFT, fitted and evaluated (SFT's evaluation too): in this process in
    order (``pool`` None, output streamed), or on the pool's workers, each free worker taking
    the first ready stage of :data:`ORDER`; a line per finished stage, then each log in order
    (on stderr)."""
    if pool is None:
        results: dict[str, dict[str, Any]] = {stage: run_stage(stage) for stage in STAGES[1:]}
        results["sft"] = {}
        for stage in EVALUATED:
            results[stage]["evaluation"] = evaluate_export(export_of(stage), export_of("sft"))
        return results
    pending, results, running = [*ORDER, "sft"], {"sft": {}}, {}
    while pending or running:
        while len(running) < workers and (stage := next_ready(pending, results)) is not None:
            running[pool.submit(stage_task, str(out), threads, stage)] = stage
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            stage = running.pop(future)
            try:
                results[stage] = results.get(stage, {}) | future.result()
            except Exception as err:
                where = f"; its output is in {stage_log(stage)}" if stage != "sft" else ""
                raise RuntimeError(f"prefl toy: stage {stage!r} failed{where}") from err
            if stage != "sft":
                wall = results[stage]["wall"]
                print(f"prefl toy: {stage} done in {wall:.1f} s", file=sys.stderr, flush=True)
    for stage in STAGES[1:]:  # on stderr, where Lightning and prefl's reports write
        log = stage_log(stage).read_text(encoding="utf-8")
        print(f"\n===== {stage} ({stage_log(stage)}) =====\n{log}", file=sys.stderr, flush=True)
    return results


def sweep_task(
    out: str, threads: int, method: str, key: str, value: float, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """One sweep run (no export, final evaluation only): its frontier point; ``extra`` are
    further config overrides."""
    from prefl.callbacks import EvalCallback

    enter_worker(out, threads)
    quiet = [
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
    ]
    evaluation = EvalCallback(num_samples=4)
    log = Path("runs/toy/sweep") / f"{method}_{key}_{value}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with output_to(log):
        fit_stage(method, [*quiet, f"--model.init_args.{key}", str(value), *extra], [evaluation])
    return {key: value, **frontier_points(evaluation.history)[-1]}


def run_sweep(summary: dict[str, Any], pool: Any = None, threads: int = 1) -> None:
    """DPO, online DPO and KTO over β, PPO over the KL coefficient (no export, final
    evaluation only), in the current directory; on ``pool``'s workers when given."""
    runs = [("dpo", "beta", value) for value in DPO_BETAS]
    runs += [("online_dpo", "beta", value) for value in ONLINE_DPO_BETAS]
    runs += [("kto", "beta", value) for value in KTO_BETAS]
    runs += [("ppo", "kl_coef", value) for value in PPO_KL_COEFS]
    summary["sweep"] = {"dpo": [], "online_dpo": [], "kto": [], "ppo": []}
    out = str(Path.cwd())
    if pool is None:
        points = []
        for run in runs:
            print(f"prefl toy sweep: {run[0]} {run[1]}={run[2]}", flush=True)
            points.append(sweep_task(out, threads, *run))
    else:
        print(f"prefl toy sweep: {len(runs)} runs on the worker processes", flush=True)
        points = [f.result() for f in [pool.submit(sweep_task, out, threads, *r) for r in runs]]
    for (method, _, _), point in zip(runs, points, strict=True):
        summary["sweep"][method].append(point)


def run_pipeline(
    out: str | Path, sweep: bool = False, workers: int = 1, threads: int = 1
) -> dict[str, Any]:
    """Run the whole toy pipeline in ``out`` and return the summary (also written to JSON).

    Args:
        out: The output directory (the runs, ``summary.json``, ``frontier.png``).
        sweep: Also run the β / KL-coefficient sweeps.
        workers: Processes for the stages after SFT (and the sweep); 1 = all in this process.
        threads: Torch intra-op threads in each worker.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(out)
    try:
        with worker_pool(workers) as pool:
            start = time.perf_counter()
            sft = run_stage("sft")
            results = run_stages(pool, workers, out, threads)
            results["sft"] |= sft
            summary: dict[str, Any] = {
                "frontier": {s: r["frontier"] for s, r in results.items() if "frontier" in r},
                "wall_seconds": {s: r["wall"] for s, r in results.items()},
                "sft_entropy": results["sft"]["sft_entropy"],
                "reward_model": results["reward"]["reward_model"],
            }
            summary["stages"] = {stage: results[stage]["evaluation"] for stage in EVALUATED}
            if sweep:
                run_sweep(summary, pool, threads)
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
        "--workers",
        type=int,
        default=None,
        help="processes for the stages after SFT, which run side by side (default: one per "
        "core that --threads leaves, at most 2; 1 = everything in this process, in order)",
    )
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
    workers = args.workers or default_workers(args.threads)
    run_pipeline(args.out, sweep=args.sweep, workers=workers, threads=args.threads)


if __name__ == "__main__":
    main()
