"""SampleWriter: :class:`prefl.SampleModule`'s answers to JSONL, once per prompt, resumable.

**The SAMPLES file** is ``<dirpath>/samples.jsonl``, UTF-8, one JSON object per line and per
prompt, sorted by row id once a run ends::

    {"prompt": "What is ...?"                      (a text, or a list of chat messages
               | [{"role": "user", "content": "..."}, ...],   exactly as the data gave it)
     "completions": ["...", "..."],                (num_samples texts, special tokens removed)
     "meta": {"row": 17,                           (the prompt's row index in its source split:
                                                    its id, unique in the file)
              "model": "runs/sft/export",          (the model's name or path)
              "num_samples": 2, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 256,
              "seed": 0,                           (the run seed; sample j of row r was drawn
                                                    from sample_seed(seed, r, j) alone)
              "ended": [true, false],              (per completion: it emitted EOS; false = cut
                                                    at max_new_tokens)
              "lengths": [41, 256]}}               (per completion: tokens, EOS included)

``prompt`` is what the data module's row held: the ``prompt`` text (explicit rows), the common
prefix of an implicit row, or the message list of a conversational row (HH transcripts read with
``row_format="hh_chat"`` become messages). The keys above are the whole schema.

**Exactly once across ranks.** Each rank appends the rows of its batches, as they finish, to
``<dirpath>/parts/rank<R>.jsonl`` (flushed after every batch); the distributed sampler's
padding repeats never reach it (:meth:`prefl.SampleModule.predict_step` drops them). When
``predict`` ends, global rank 0 merges the parts into ``samples.jsonl`` (written to a temporary
file, then renamed) and deletes them. The ranks must share ``dirpath`` (one filesystem).

**Resumable.** At the start of ``predict`` rank 0 merges whatever an earlier run left in
``dirpath`` (the merged file and the parts of a run that was stopped: a last line cut short by a
kill is dropped, that prompt is sampled again), and every rank learns the row ids already
written. The data module leaves those rows out of its predict loader
(:meth:`prefl.data.PreferenceDataModule.skip_predict_rows`, so the remaining prompts come in
full batches), and the writer never writes a row id twice in any case. Rows already written are
kept byte for byte. A run whose model or sampling settings differ from those the file was made
with is refused (use another ``dirpath``).

The filter lives in the data module because that is where batches are formed: skipping rows in
the module would sample the remaining prompts in ragged batches, and a data module is where a
``Trainer`` asks for ``predict``'s rows. The writer owns the files, so it reads what is done.

**Progress.** Lightning's progress bar (TQDM or Rich) shows the completions per second of rank 0
beside its batch count (also kept in :attr:`SampleWriter.rate`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

#: Settings that must match between a run and the rows already in its ``dirpath``.
SETTINGS = ("model", "num_samples", "temperature", "top_p", "max_new_tokens", "seed")


class SamplesFileError(ValueError):
    """A SAMPLES file (or a part of one) that cannot be read, with its path and line number."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}, line {line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


def read_rows(path: Path) -> tuple[dict[int, str], dict[str, Any] | None, int]:
    """The complete lines of a SAMPLES file (or part) by row id, the ``meta`` of the first one,
    and how many lines were cut short (a last line without its newline: a killed writer).

    Raises:
        SamplesFileError: A complete line that is not a sample row (path and line number).
    """
    rows: dict[int, str] = {}
    first: dict[str, Any] | None = None
    cut = 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                cut += 1
                continue
            try:
                meta = json.loads(line)["meta"]
                row = meta["row"]
            except (ValueError, KeyError, TypeError) as err:
                raise SamplesFileError(path, number, f"not a sample row ({err!r})") from err
            if not isinstance(row, int) or isinstance(row, bool):
                raise SamplesFileError(path, number, f"meta.row must be an integer, got {row!r}")
            first = meta if first is None else first
            rows.setdefault(row, line)
    return rows, first, cut


class SampleWriter(BasePredictionWriter):
    """Write :class:`prefl.SampleModule`'s samples to ``<dirpath>/samples.jsonl`` (see the
    module docstring for the schema, the exactly-once rule and resuming).

    Args:
        dirpath: Output directory (created); running again into it resumes.
        filename: Name of the merged file inside ``dirpath``.
    """

    def __init__(self, dirpath: str, filename: str = "samples.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.dirpath, self.filename = Path(dirpath), filename
        self.written: set[int] = set()
        self.resumed = 0
        self._file: Any = None
        self._start, self._completions = 0.0, 0
        self.rate = 0.0

    @property
    def path(self) -> Path:
        """The merged SAMPLES file."""
        return self.dirpath / self.filename

    def merge(self, settings: dict[str, Any] | None = None) -> list[int]:
        """Merge the parts into the SAMPLES file (rows sorted by id, each kept as written, the
        first of a repeated id kept) and delete them; returns the row ids now in it.

        Args:
            settings: The current run's settings; rows made with other ones raise ValueError.
        """
        sources = [self.path] if self.path.is_file() else []
        sources += sorted((self.dirpath / "parts").glob("rank*.jsonl"))
        rows: dict[int, str] = {}
        cut = 0
        for source in sources:
            found, meta, n_cut = read_rows(source)
            cut += n_cut
            if settings is not None and meta is not None:
                _check_settings(source, meta, settings)
            for row, line in found.items():
                rows.setdefault(row, line)
        if cut:
            rank_zero_info(f"prefl samples: dropped {cut} line(s) cut short by a stopped run")
        self.dirpath.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        with partial.open("w", encoding="utf-8") as f:
            f.writelines(rows[row] for row in sorted(rows))
        os.replace(partial, self.path)
        for source in sources[1 if self.path in sources else 0 :]:
            source.unlink()
        return sorted(rows)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Before ``predict``'s loader is built: rank 0 merges what an earlier run left, every
        rank learns the row ids done (broadcast), and the data module is told to skip them."""
        if stage != "predict":
            return
        settings = pl_module.settings() if hasattr(pl_module, "settings") else None
        done = self.merge(settings) if trainer.is_global_zero else None
        done = trainer.strategy.broadcast(done, src=0)
        self.written, self.resumed = set(done), len(done)
        skip = getattr(trainer.datamodule, "skip_predict_rows", None)
        if skip is not None:
            skip(done)
        if done:
            rank_zero_info(f"prefl samples: {len(done)} prompt(s) already in {self.path}")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open this rank's part file and start the completions/s clock."""
        parts = self.dirpath / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        self._file = (parts / f"rank{trainer.global_rank}.jsonl").open("a", encoding="utf-8")
        self._start, self._completions = time.perf_counter(), 0

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append the batch's rows (ids not written yet) and flush; update the progress bar."""
        for sample in prediction:
            row = sample["meta"]["row"]
            if row in self.written:
                continue
            self.written.add(row)
            self._file.write(json.dumps(sample, ensure_ascii=False) + "\n")
            self._completions += len(sample["completions"])
        self._file.flush()
        os.fsync(self._file.fileno())
        self._show_rate(trainer)

    def _show_rate(self, trainer: Trainer) -> None:
        """Completions per second of this rank on Lightning's predict bar (TQDM: the postfix;
        Rich: the description); only rank 0 shows a bar."""
        callback = trainer.progress_bar_callback
        rate = self._completions / max(time.perf_counter() - self._start, 1e-9)
        self.rate = rate
        text = f"{rate:.2f} completions/s"
        bar = getattr(callback, "predict_progress_bar", None)
        if bar is not None and hasattr(bar, "set_postfix_str"):  # TQDMProgressBar
            bar.set_postfix_str(text)
        task = getattr(callback, "predict_progress_bar_id", None)
        progress = getattr(callback, "progress", None)
        if task is not None and progress is not None:  # RichProgressBar
            progress.update(task, description=f"{callback.predict_description} {text}")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the part file; once every rank has, rank 0 merges the parts."""
        if self._file is not None:
            self._file.close()
            self._file = None
        trainer.strategy.barrier("prefl_sample_writer")
        if trainer.is_global_zero:
            rows = self.merge()
            new = len(rows) - self.resumed
            rank_zero_info(f"prefl samples: {len(rows)} prompt(s) in {self.path} ({new} new)")


def _check_settings(source: Path, meta: dict[str, Any], settings: dict[str, Any]) -> None:
    """Raise when rows of ``source`` were made with other settings than this run's."""
    differ = [k for k in SETTINGS if k in settings and meta.get(k) != settings[k]]
    if differ:
        both = ", ".join(f"{k}: {meta.get(k)!r} there, {settings[k]!r} now" for k in differ)
        raise ValueError(
            f"{source} holds samples made with other settings ({both}); write to another "
            "dirpath, or run with the same settings to resume"
        )
