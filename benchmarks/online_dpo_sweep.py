"""Online DPO over β on the toy task, scored against the exact optimum: the online-DPO part of
``python -m prefl.toy --sweep``, alone, from an existing SFT export.

Each β runs ``configs/toy/online_dpo.yaml`` as the sweep does (:func:`prefl.pipeline.sweep_task`:
no export, one final evaluation with 4 samples per held-out prompt) in a scratch directory
holding a copy of the SFT export; ``frontier_efficiency`` is the reward over R*(the KL paid).
``--samples`` overrides the config's samples per prompt (``k``).

    python benchmarks/online_dpo_sweep.py --sft runs/pipeline/runs/toy/sft/export [--samples 4]

Prints a table and writes ``benchmarks/results/online_dpo_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results/online_dpo_sweep.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", required=True, help="the toy SFT export (a main job's)")
    p.add_argument("--betas", default="0.1,0.25,0.5,1.0,2.0", help="comma-separated β values")
    p.add_argument("--samples", type=int, default=None, help="k (default: the config's)")
    p.add_argument("--json", default=str(RESULTS), help="where to write the results")
    a = p.parse_args()
    import prefl.pipeline as pipeline
    from prefl.pipeline_report import OPTIMUM_BETAS
    from prefl.tasks.toy_optimum import frontier_reward_at, optimal_frontier

    work = Path(tempfile.mkdtemp(prefix="prefl-online-sweep-"))
    shutil.copytree(a.sft, work / "runs/toy/sft/export")
    extra = [] if a.samples is None else ["--model.init_args.num_samples", str(a.samples)]
    curve = optimal_frontier(OPTIMUM_BETAS)
    rows = []
    for beta in (float(b) for b in a.betas.split(",")):
        start = time.perf_counter()
        point = pipeline.sweep_task(str(work), 1, "online_dpo", "beta", beta, extra)
        point["frontier_efficiency"] = point["reward"] / frontier_reward_at(point["kl"], curve)
        point["seconds"] = time.perf_counter() - start
        rows.append(point)
        print(
            f"beta {beta:g}: reward {point['reward']:+.3f}, KL {point['kl']:.2f}, "
            f"of R* {point['frontier_efficiency']:.1%} ({point['seconds']:.0f} s)",
            flush=True,
        )
    result = {"name": "online_dpo_sweep", "config": vars(a), "points": rows}
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
