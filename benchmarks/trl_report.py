"""Driver side of the prefl-vs-TRL benchmarks: run the workers, alternate the libraries, report.

:func:`compare` builds the shared model directory and data once (through the benchmark's own
``prepare`` function), then runs ``repeats`` rounds of one prefl worker and one TRL worker, each a
fresh subprocess (``python <script> --worker <lib> ...``) so that peak RSS is per run: it is the
child's ``ru_maxrss`` from ``os.wait4``. The medians over the repeats, and the prefl/TRL ratios of
throughput and peak RSS, are printed as a markdown table and written as JSON together with the
config, the machine (CPU count, library versions) and every run's raw numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from trl_harness import LIBRARIES, RESULT_PREFIX

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(description: str, steps: int, batch: int, lr: float) -> argparse.ArgumentParser:
    """The options every benchmark shares (each script adds its own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=batch, help="per-device batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per library (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--lr", type=float, default=lr, help="AdamW learning rate")
    parser.add_argument("--max-length", type=int, default=32, help="prompt + completion tokens")
    parser.add_argument("--max-prompt-length", type=int, default=16, help="prompt tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="prefl only: PreferenceDataModule(group_by_length=True) (TRL keeps its shuffle)",
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser


def prefl_revision() -> dict[str, Any]:
    """Where the installed prefl lives (an editable install may point at another checkout), its
    git commit, and whether its ``prefl/`` has uncommitted changes."""
    spec = importlib.util.find_spec("prefl")
    if spec is None or not spec.submodule_search_locations:
        return {"path": None, "commit": None, "prefl_modified": None}
    package = Path(next(iter(spec.submodule_search_locations)))
    git = ["git", "-C", str(package.parent)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "prefl"], capture_output=True, text=True
        )
    except OSError:
        return {"path": str(package), "commit": None, "prefl_modified": None}
    return {
        "path": str(package),
        "commit": commit.stdout.strip() or None,
        "prefl_modified": bool(status.stdout.strip()),
    }


def machine_info() -> dict[str, Any]:
    """CPU count, platform, the versions of every library in the comparison, prefl's commit."""
    versions = {}
    for name in ("torch", "trl", "transformers", "lightning", "accelerate", "datasets", "prefl"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions,
        "prefl_git": prefl_revision(),
    }


def micro_parser(description: str, rounds: int, results: Path) -> argparse.ArgumentParser:
    """The options every micro-benchmark has: ``--rounds``, ``--threads``, ``--seed`` and
    ``--json`` (default ``results``); the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=results)
    return parser


def write_timings(
    args: argparse.Namespace,
    name: str,
    medians: dict[str, float],
    times: dict[str, list[float]],
    **config: Any,
) -> dict[str, Any]:
    """Write a micro-benchmark's JSON to ``args.json`` (its options and ``config``, the machine,
    the medians and every round's seconds) and return it."""
    payload = {
        "name": name,
        "config": {**vars(args), "json": str(args.json), **config},
        "machine": machine_info(),
        "median_s": medians,
        "times_s": times,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return payload


def worker_argv(script: Path, lib: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    """Command line of one worker: the script itself with ``--worker`` and the same options."""
    argv = [sys.executable, str(script), "--worker", lib, "--workdir", str(workdir)]
    for key, value in vars(args).items():
        if key in ("worker", "workdir", "json", "repeats") or value is None or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def run_worker(argv: list[str], threads: int, log: Path) -> dict[str, Any]:
    """Run one worker subprocess; return its result line plus its peak RSS and wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read() if proc.stdout is not None else ""
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if code != 0 or not lines:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"worker {argv[3]} failed (exit {code}):\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    result["cpu_time_s"] = usage.ru_utime + usage.ru_stime
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per library and the prefl/TRL ratios. ``throughput`` is each run's whole timed
    window (then the median over runs); ``throughput_median_step`` divides the samples per step
    by the median step time over all timed steps of all runs, which a burst of load from other
    jobs on a shared machine moves much less."""
    out: dict[str, Any] = {}
    for lib in LIBRARIES:
        mine = [r for r in runs if r["lib"] == lib]
        step = _median([t for r in mine for t in r["timed_step_times_s"]])
        out[lib] = {
            "throughput": _median([r["throughput"] for r in mine]),
            "throughput_median_step": mine[0]["samples_per_step"] / step,
            "median_step_s": step,
            "median_step_cpu_s": _median([t for r in mine for t in r["timed_step_cpu_s"]]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in mine]),
            "rss_at_train_start_mib": _median([r["rss_at_train_start_mib"] for r in mine]),
            "runs": len(mine),
        }
        if "mean_completion_words" in mine[0]:
            out[lib]["mean_completion_tokens"] = _median([r["mean_completion_words"] for r in mine])
    p, t = out["prefl"], out["trl"]
    ratios = {
        "throughput": "throughput",
        "throughput_median_step": "throughput_median_step",
        "peak_rss": "peak_rss_mib",
        "median_step_cpu": "median_step_cpu_s",
    }
    for name, key in ratios.items():
        out[f"ratio_{name}"] = p[key] / t[key]
    return out


def markdown_table(summary: dict[str, Any], unit: str, title: str) -> str:
    """The summary as a markdown table (medians; the last column is prefl ÷ TRL)."""
    p, t = summary["prefl"], summary["trl"]
    rows = [
        (f"throughput ({unit}/s)", "throughput", 1.0),
        (f"throughput at the median step ({unit}/s)", "throughput_median_step", 1.0),
        ("median step time (ms)", "median_step_s", 1e3),
        ("median step CPU time (ms, both threads)", "median_step_cpu_s", 1e3),
        ("peak RSS (MiB)", "peak_rss_mib", 1.0),
    ]
    if "mean_completion_tokens" in p:
        rows.append(("mean completion tokens (excl. EOS)", "mean_completion_tokens", 1.0))
    n = min(p["runs"], t["runs"])
    lines = [f"**{title}** (median of {n} runs each)", "", "| | prefl | TRL | prefl / TRL |"]
    lines.append("|---|---|---|---|")
    for name, key, scale in rows:
        a, b = scale * p[key], scale * t[key]
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    return "\n".join(lines)


def compare(
    script: Path,
    args: argparse.Namespace,
    prepare: Callable[[Path, argparse.Namespace], None],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Prepare the shared inputs, run the alternating workers, print and write the report.

    Args:
        script: The benchmark script (run again as each worker).
        args: Its parsed options.
        prepare: Writes the model directory and the data into the work directory.
        meta: ``name``, ``unit`` (what one sample is), ``title`` and ``matched`` (what is equal
            between the libraries), copied into the JSON.
    """
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix=f"{meta['name']}_") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args)
        runs = []
        for repeat in range(args.repeats):
            for lib in LIBRARIES:
                argv = worker_argv(script, lib, args, workdir)
                result = run_worker(argv, args.threads, workdir / f"{lib}_{repeat}.log")
                result.update(lib=lib, repeat=repeat)
                runs.append(result)
                print(
                    f"  run {repeat + 1}/{args.repeats} {lib:5s}: "
                    f"{result['throughput']:.1f} {meta['unit']}/s, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    summary = summarize(runs)
    print(markdown_table(summary, meta["unit"], meta["title"]))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine["load_average_at_end"] = list(os.getloadavg())
    payload = {**meta, "config": config, "machine": machine, "summary": summary}
    payload["runs"] = runs
    out = args.json or RESULTS_DIR / f"{meta['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return payload
