"""Checks of raw data before tokenization: readable local files and the columns a mode needs.

``datasets``' loaders fail on a broken file with errors that do not say where it is broken
(``An error occurred while generating the dataset``, a bare ``UnicodeDecodeError``, even a
``StopIteration`` for an empty JSON Lines file). :func:`load_local` loads a local file or folder
through ``datasets.load_dataset`` as usual and, only when that fails, reads the file(s) itself to
find the problem, then raises :class:`DataFileError` naming the file and the 1-based line: a line
that is not valid JSON, a JSON Lines line that is not an object, invalid UTF-8 (with its byte
offset), or a file without rows.

:func:`check_columns` checks one split against the columns that ``mode`` and the row format need,
naming the split, what was expected and found, and the ``*_column=`` setting that fixes a
misnamed column.
"""

from __future__ import annotations

import bz2
import dataclasses
import difflib
import gzip
import json
import lzma
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import datasets

from prefl.data.formats import Columns, detect_format, required_columns
from prefl.data.tokenize import SOURCE_ROW

#: ``datasets`` builder for each data-file suffix.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
#: Compression suffixes that ``datasets`` reads, and how to open them here (None: not here).
COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]] | None] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".zst": None,
}
#: A file problem: (1-based line or None, what is wrong).
Problem = tuple[int | None, str]


class DataFileError(ValueError):
    """A local data file that cannot be read, with where (file, 1-based line when known)."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        where = f"dataset file {str(path)!r}" + (f", line {line}" if line else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.line, self.problem))


def _data_suffix(path: Path) -> str:
    """The file's type suffix, compression left out: ``.jsonl`` for ``rows.jsonl.gz``."""
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    return suffixes[-1] if suffixes else ""


def builder_for(path: Path) -> str | None:
    """The ``datasets`` builder for a data file (``json``, ``parquet``, ``csv``), or None."""
    return BUILDERS.get(_data_suffix(path))


def _open(path: Path) -> IO[bytes] | None:
    """Open ``path`` for reading bytes, decompressed; None when it cannot be decompressed here."""
    if path.suffix in COMPRESSIONS:
        opener = COMPRESSIONS[path.suffix]
        return opener(path) if opener is not None else None
    return path.open("rb")


def _decoded_lines(raw: Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text); raise :class:`_Found` at the first invalid UTF-8."""
    offset = 0
    for number, line in enumerate(raw, 1):
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as err:
            byte = line[err.start]
            raise _Found(
                number,
                f"invalid UTF-8 (byte 0x{byte:02x} at byte offset {offset + err.start}); "
                "save the file as UTF-8",
            ) from None
        offset += len(line)


class _Found(Exception):  # noqa: N818 - internal control flow, carries a Problem
    def __init__(self, line: int | None, problem: str) -> None:
        super().__init__(line, problem)
        self.found: Problem = (line, problem)


def _json_lines_problem(lines: Iterable[tuple[int, str]]) -> Problem | None:
    rows = 0
    for number, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return number, f"invalid JSON at column {err.colno}: {err.msg}"
        if not isinstance(value, dict):
            kind = "null" if value is None else type(value).__name__
            return number, f"expected a JSON object (one row per line), got {kind}"
        rows += bool(value)
    return None if rows else (None, "no rows (the file is empty or holds no columns)")


def _json_document_problem(text: str) -> Problem | None:
    """A ``.json`` file: one document (a list of row objects), or JSON Lines."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            is_lines = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_lines = False
        if is_lines:  # JSON Lines in a .json file, as datasets also accepts
            return _json_lines_problem(enumerate(text.split("\n"), 1))
        return err.lineno, f"invalid JSON at column {err.colno}: {err.msg}"
    if value in ([], {}):
        return None, "no rows (the JSON document is empty)"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                return None, f"item {i} of the JSON list is not an object (a row)"
    return None


def file_problem(path: Path) -> Problem | None:
    """Read a local data file and return where it is broken, or None if nothing is found.

    Checks UTF-8 (JSON and CSV), JSON syntax per line (JSON Lines) or per document (``.json``),
    that JSON Lines rows are objects, and that the file has rows. Parquet files and files this
    module cannot decompress (``.zst``) are not checked.
    """
    builder = builder_for(path)
    if builder not in ("json", "csv"):
        return None
    stream = _open(path)
    if stream is None:
        return None
    try:
        with stream:
            lines = _decoded_lines(stream)
            if builder == "csv":
                rows = sum(1 for _, line in lines if line.strip())
                return None if rows > 1 else (None, "no rows (the CSV file has no data lines)")
            if _data_suffix(path) == ".jsonl":
                return _json_lines_problem(lines)
            return _json_document_problem("".join(line for _, line in lines))
    except _Found as found:
        return found.found


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (``datasets`` wraps the reader's error)."""
    for _ in range(32):  # chains are short; this also stops on a cycle
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            break
        err = inner
    return err


def _loader_problem(err: BaseException) -> Problem:
    """What a loader error says, with the line when its message names one (pandas' CSV)."""
    cause = _root_cause(err)
    text = " ".join(str(cause).split()) or type(cause).__name__
    if "corresponds to no data" in text:  # datasets' words for a file without rows
        return None, "no rows"
    match = re.search(r"\bline (\d+)\b", text)
    return (int(match.group(1)) if match else None), f"cannot be read: {text}"


def data_files(source: Path) -> list[Path]:
    """The data files of a local file or folder source (the folder's, sorted)."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file() and builder_for(p))


def load_local(
    source: Path,
    cache_dir: str | None,
    name: str | None = None,
    data_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load a local data file or folder with ``datasets.load_dataset``.

    Args:
        source: The file or folder.
        cache_dir: ``datasets``' cache folder.
        name: A folder dataset's configuration, as for a hub dataset.
        data_dir: The folder inside ``source`` to load, as for a hub dataset.

    Raises:
        DataFileError: The file has an unsupported type, or the loader failed; then the message
            names the broken file and, where it can be found, the 1-based line.
    """
    if source.is_file():
        builder = builder_for(source)
        if builder is None:
            raise DataFileError(
                source, None, f"unsupported type; expected one of {sorted(BUILDERS)}"
            )
        args: dict[str, Any] = {"path": builder, "data_files": str(source)}
    else:
        args = {"path": str(source), "name": name, "data_dir": data_dir}
    try:
        return datasets.load_dataset(**args, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - re-raised below, naming the file
        for path in data_files(source / data_dir if data_dir and source.is_dir() else source):
            problem = file_problem(path)
            if problem is not None:
                raise DataFileError(path, *problem) from err
        raise DataFileError(source, *_loader_problem(err)) from err


def undecodable(source: Any, split: str, err: UnicodeDecodeError) -> ValueError:
    """The error for text that fails to decode when rows are read (``pyarrow``'s JSON reader
    loads invalid UTF-8 and fails only then): the broken file and line for a local source."""
    if isinstance(source, str | Path) and Path(source).exists():
        for path in data_files(Path(source)):
            problem = file_problem(path)
            if problem is not None:
                return DataFileError(path, *problem)
    return ValueError(f"split {split!r} of dataset {source!r} holds invalid UTF-8 text: {err}")


def looks_like_file(source: str) -> bool:
    """True for a source named like a data file (``rows.jsonl``, ``x.csv.gz``), not a hub id."""
    return builder_for(Path(source)) is not None


def _suggestion(missing: str, columns: Columns, unused: list[str]) -> str:
    close = difflib.get_close_matches(missing, unused, n=1, cutoff=0.6)
    keys = [f.name for f in dataclasses.fields(columns) if getattr(columns, f.name) == missing]
    if not close or not keys:
        return ""
    return f" (did you mean {keys[0]}_column={close[0]!r}?)"


def check_columns(
    split: str,
    ds: datasets.Dataset,
    mode: str,
    row_format: str,
    columns: Columns,
    source_name: str,
) -> str:
    """Check that ``ds`` has rows and the columns ``mode`` needs; return the row format.

    Args:
        split: The split's name, for messages.
        ds: The raw split.
        mode: ``pairs``, ``prompts`` or ``sft``.
        row_format: ``auto`` (detect from the first row) or a format name.
        columns: The configured column names.
        source_name: How to name the dataset in messages.

    Raises:
        ValueError: The split is empty, its format cannot be detected, or it lacks a column.
    """
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of dataset {source_name} is empty")
    names = [n for n in ds.column_names if n != SOURCE_ROW]
    hint = (
        "Map your column names with prompt_column=, chosen_column=, rejected_column=, "
        "completion_column=, messages_column= (or set row_format=)."
    )
    if row_format == "auto":
        try:
            row_format = detect_format(ds[0], columns)
        except ValueError as err:
            raise ValueError(f"split {split!r}, row 0: {err}. {hint}") from None
    needed = required_columns(mode, row_format, columns, names)
    missing = [c for c in needed if c not in names]
    if missing:
        unused = [n for n in names if n not in needed]
        tips = "".join(_suggestion(m, columns, unused) for m in missing)
        raise ValueError(
            f"split {split!r} lacks column(s) {missing}: mode {mode!r} with format "
            f"{row_format!r} expects {needed}, found {names}{tips}. {hint}"
        )
    return row_format


def has_margin(split: str, names: list[str], columns: Columns) -> bool:
    """Whether a split has the optional margin column; one named by ``margin_column=`` (not
    the default ``margin``) must be there, or it would be ignored silently."""
    if columns.margin not in names and columns.margin != Columns.margin:
        found = [n for n in names if n != SOURCE_ROW]
        raise ValueError(
            f"split {split!r} has no margin column {columns.margin!r} (set by "
            f"margin_column={columns.margin!r}); found {found}"
        )
    return columns.margin in names
