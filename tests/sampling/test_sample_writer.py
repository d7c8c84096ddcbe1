"""SampleModule + SampleWriter in one process on the toy task: one row per prompt with ``k``
answers, samples that depend on the seed and the row alone (not on the batch size), and a
resumed run that keeps what was written and samples only the rest."""

from __future__ import annotations

import json

import pytest

from prefl import PreferenceDataModule, SampleModule, SampleWriter


def _sample(sft_dir, quiet_trainer, tmp_path, out, batch_size=2, max_samples=6, **kwargs):
    data = PreferenceDataModule(
        mode="prompts", max_length=32, batch_size=batch_size, max_samples=max_samples
    )
    module = SampleModule(sft_dir, num_samples=2, max_new_tokens=6, seed=3, **kwargs)
    writer = SampleWriter(str(out))
    trainer = quiet_trainer(tmp_path, callbacks=[writer])
    trainer.predict(module, datamodule=data, return_predictions=False)
    return writer, [json.loads(line) for line in writer.path.read_text().splitlines()]


def test_one_row_per_prompt_independent_of_the_batch(sft_dir, quiet_trainer, tmp_path):
    _, rows = _sample(sft_dir, quiet_trainer, tmp_path, tmp_path / "a", batch_size=2)
    _, other = _sample(sft_dir, quiet_trainer, tmp_path, tmp_path / "b", batch_size=3)
    ids = [r["meta"]["row"] for r in rows]
    assert ids == sorted(set(ids)) and len(ids) > 0
    assert all(len(r["completions"]) == 2 for r in rows)
    assert all(r["meta"]["seed"] == 3 and r["meta"]["num_samples"] == 2 for r in rows)
    assert rows == other  # seeds per (run seed, row, sample): the batch does not matter


def test_a_resumed_run_keeps_rows_and_samples_only_the_rest(sft_dir, quiet_trainer, tmp_path):
    out = tmp_path / "run"
    _, full = _sample(sft_dir, quiet_trainer, tmp_path, tmp_path / "full")
    lines = (tmp_path / "full" / "samples.jsonl").read_text().splitlines(keepends=True)
    out.mkdir()
    cut = lines[-1][: len(lines[-1]) // 2]  # a killed writer's last line, cut short
    (out / "samples.jsonl").write_text("".join(lines[:2]) + cut)
    writer, resumed = _sample(sft_dir, quiet_trainer, tmp_path, out)
    assert writer.resumed == 2
    assert resumed == full
    assert (out / "samples.jsonl").read_text().splitlines(keepends=True)[:2] == lines[:2]


def test_other_settings_in_the_same_dirpath_are_refused(sft_dir, quiet_trainer, tmp_path):
    _sample(sft_dir, quiet_trainer, tmp_path, tmp_path / "run")
    with pytest.raises(ValueError, match=r"temperature: 1.0 there, 0.5 now"):
        _sample(sft_dir, quiet_trainer, tmp_path, tmp_path / "run", temperature=0.5)


def test_top_p_changes_the_samples(sft_dir, quiet_trainer, tmp_path):
    _, rows = _sample(sft_dir, quiet_trainer, tmp_path, tmp_path / "a")
    _, nucleus = _sample(sft_dir, quiet_trainer, tmp_path, tmp_path / "b", top_p=0.3)
    texts = [r["completions"] for r in rows]
    assert texts != [r["completions"] for r in nucleus]
    assert all(r["meta"]["top_p"] == 0.3 for r in nucleus)
