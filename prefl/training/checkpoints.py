"""Checking a checkpoint before resuming from it: a damaged file gets a clear error, not a stack
trace from deep inside ``torch.load``, and the error names the intact checkpoints beside it.

Lightning writes local checkpoints atomically (a temporary file renamed into place), so a run
killed while saving leaves the previous checkpoint whole; a truncated or corrupt file comes from
elsewhere (a full disk, a partial copy or sync). A ``.ckpt`` file is a ``torch.save`` zip
archive: it must open as one (its central directory sits at the very end, so truncation breaks
it), every member must lie inside the file, and the archive must hold ``data.pkl``. A sharded
checkpoint (a folder written by ``torch.distributed.checkpoint``) must hold its ``.metadata``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.types import _PATH


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (truncated, corrupt or incomplete)."""


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` (a ``.ckpt`` file or a sharded folder), or
    None when it looks whole. Reads only the archive's directory, not the tensors."""
    path = Path(path)
    if path.is_dir():
        return None if (path / ".metadata").is_file() else "sharded checkpoint without .metadata"
    if not path.is_file():
        return "no such file"
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"not a readable torch.save archive ({err}); the file is truncated or corrupt"
    if not any(m.filename.endswith("data.pkl") for m in members):
        return "the archive holds no data.pkl (not a torch.save checkpoint)"
    for member in members:
        if member.header_offset + member.compress_size > size:
            return f"member {member.filename!r} runs past the end of the file (truncated)"
    return None


def intact_neighbours(path: str | Path) -> list[str]:
    """The other checkpoints in ``path``'s folder that pass :func:`checkpoint_problem`, newest
    first."""
    path = Path(path)
    found = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()]
    found.sort(key=os.path.getmtime, reverse=True)
    return [str(p) for p in found if checkpoint_problem(p) is None]


def check_checkpoint(path: str | Path | None) -> None:
    """Raise :class:`CorruptCheckpointError` naming the file, the problem and the intact
    checkpoints beside it, if ``path`` cannot be resumed from; None or a remote URL passes.

    Args:
        path: The checkpoint to resume from (``Trainer.ckpt_path``, already resolved by
            Lightning from ``"last"`` / ``"best"``).
    """
    if path is None or "://" in str(path):
        return
    problem = checkpoint_problem(path)
    if problem is None:
        return
    others = intact_neighbours(path)
    hint = f"intact checkpoints beside it: {others}" if others else "no intact checkpoint beside it"
    raise CorruptCheckpointError(
        f"cannot resume from {str(path)!r}: {problem}. Pass another one with --ckpt_path "
        f"(or ckpt_path=); {hint}"
    )


class CheckedCheckpointIO(CheckpointIO):
    """The strategy's checkpoint I/O with :func:`check_checkpoint` before every load.

    :class:`~prefl.modules.base.CausalLMModule` installs it in ``setup`` (which runs before
    Lightning restores a checkpoint), wrapping whatever the strategy had; saving and removing
    are passed through unchanged.

    Args:
        inner: The checkpoint I/O to wrap.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save through the wrapped I/O."""
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Check the file, then load it through the wrapped I/O."""
        check_checkpoint(path)
        inner = self.inner
        return inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove through the wrapped I/O."""
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear the wrapped I/O down."""
        self.inner.teardown()
