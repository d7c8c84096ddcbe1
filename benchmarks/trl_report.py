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
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=batch, help="per-device batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per library (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--lr", type=float, default=lr, help="AdamW learning rate")
    parser.add_argument("--max-length", type=int, default=32, help="prompt + completion tokens")
    parser.add_argument("--max-prompt-length", type=int, default=16, help="prompt tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser


def machine_info() -> dict[str, Any]:
    """CPU count, platform and the versions of every library in the comparison."""
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
    }


def worker_argv(script: Path, lib: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    """Command line of one worker: the script itself with ``--worker`` and the same options."""
    argv = [sys.executable, str(script), "--worker", lib, "--workdir", str(workdir)]
    for key, value in vars(args).items():
        if key in ("worker", "workdir", "json", "repeats") or value is None:
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
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


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per library and the prefl/TRL ratios."""
    out: dict[str, Any] = {}
    for lib in LIBRARIES:
        mine = [r for r in runs if r["lib"] == lib]
        steps = [t for r in mine for t in r["timed_step_times_s"]]
        out[lib] = {
            "throughput": statistics.median(r["throughput"] for r in mine),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            "rss_at_train_start_mib": statistics.median(r["rss_at_train_start_mib"] for r in mine),
            "median_step_s": statistics.median(steps),
            "runs": len(mine),
        }
    p, t = out["prefl"], out["trl"]
    out["ratio_throughput"] = p["throughput"] / t["throughput"]
    out["ratio_peak_rss"] = p["peak_rss_mib"] / t["peak_rss_mib"]
    out["ratio_median_step"] = p["median_step_s"] / t["median_step_s"]
    return out


def markdown_table(summary: dict[str, Any], unit: str, title: str) -> str:
    """The summary as a markdown table (medians; ratios prefl ÷ TRL)."""
    p, t = summary["prefl"], summary["trl"]
    n = min(p["runs"], t["runs"])
    rows = [
        (f"throughput ({unit}/s)", p["throughput"], t["throughput"], summary["ratio_throughput"]),
        ("median step time (ms)", 1e3 * p["median_step_s"], 1e3 * t["median_step_s"], None),
        ("peak RSS (MiB)", p["peak_rss_mib"], t["peak_rss_mib"], summary["ratio_peak_rss"]),
        ("RSS at train start (MiB)", p["rss_at_train_start_mib"], t["rss_at_train_start_mib"], None),
    ]
    lines = [f"**{title}** (median of {n} runs each)", "", "| | prefl | TRL | prefl / TRL |"]
    lines.append("|---|---|---|---|")
    for name, a, b, ratio in rows:
        r = f"{ratio:.2f}" if ratio is not None else f"{a / b:.2f}"
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {r} |")
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
