"""Worker processes of the main job: after SFT, the stages that do not depend on each other run
side by side, one process per free core, each stage's whole output in a log file of its own.

The toy models are too small to gain from a second intra-op thread (the main job runs on one), so
on 2 cores the second core was idle; a second process fitting another stage uses it. Every stage
seeds itself (``seed_everything`` in its config), so a stage fitted in a worker gives what it
gives in the main process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(threads: int) -> int:
    """Workers for ``threads`` intra-op threads each: one per core they leave, at most 2 (the
    stages after SFT form two chains of about equal length, see ``prefl.pipeline.CHAINS``)."""
    return max(1, min(2, usable_cores() // max(threads, 1)))


def warm_up() -> None:
    """Import what a stage needs, so that a worker's start overlaps with SFT."""
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401

    import prefl.cli  # noqa: F401


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """A pool of ``workers`` fresh (``spawn``) processes, started and warmed up at once; None
    for ``workers`` <= 1 (everything then runs in this process)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for _ in range(workers):
            pool.submit(warm_up)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def enter_worker(out: str, threads: int) -> None:
    """Set a worker up for a task: the output directory as working directory, ``threads``
    torch intra-op threads."""
    import torch

    os.chdir(out)
    torch.set_num_threads(threads)


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send everything this process writes to stdout and stderr to ``path`` for the duration,
    then restore both: the file descriptors (the C level, and Python streams opened earlier, such
    as logging handlers) and ``sys.stdout`` / ``sys.stderr``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "w", encoding="utf-8", buffering=1) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                with redirect_stdout(log), redirect_stderr(log):
                    yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])
