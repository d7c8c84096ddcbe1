"""The main job's worker plumbing: how many workers, and a stage's output sent to its log."""

import os
import sys

import pytest

from prefl import pipeline_workers
from prefl.pipeline_workers import default_workers, output_to


@pytest.mark.parametrize(
    ("cores", "threads", "expected"), [(1, 1, 1), (2, 1, 2), (2, 2, 1), (16, 1, 2), (16, 4, 2)]
)
def test_default_workers_one_per_free_core_at_most_two(monkeypatch, cores, threads, expected):
    monkeypatch.setattr(pipeline_workers, "usable_cores", lambda: cores)
    assert default_workers(threads) == expected


def test_output_to_sends_python_and_c_level_output_to_the_file_then_restores(tmp_path, capfd):
    log = tmp_path / "logs" / "stage.log"
    print("before", flush=True)
    with output_to(log):
        print("from python")
        sys.stderr.write("to stderr\n")
        os.write(1, b"from the C level\n")
    print("after", flush=True)
    assert log.read_text() == "from python\nto stderr\nfrom the C level\n"
    assert capfd.readouterr().out == "before\nafter\n"


def test_output_to_restores_the_streams_when_the_stage_fails(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="boom"), output_to(tmp_path / "failed.log"):
        print("partial")
        raise RuntimeError("boom")
    print("still here", flush=True)
    assert (tmp_path / "failed.log").read_text() == "partial\n"
    assert capfd.readouterr().out == "still here\n"


def test_a_failed_stage_names_itself_and_its_log(tmp_path, monkeypatch):
    """A stage that fails in a worker stops the job with an error naming the stage and its log
    file (the worker's own traceback chained below)."""
    from concurrent.futures import ThreadPoolExecutor

    from prefl import pipeline

    def stage_task(out, threads, stage):
        if stage == "kto":
            raise ValueError("diverged")
        return {"wall": 0.0}

    monkeypatch.setattr(pipeline, "stage_task", stage_task)
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(RuntimeError, match=r"stage 'kto' failed; .* runs/toy/kto\.log") as err:
            pipeline.run_stages(pool, 2, tmp_path, 1)
    assert isinstance(err.value.__cause__, ValueError)
