"""Output folders: a command writes only into a folder it may own, never into a training run."""

from __future__ import annotations

import os
from pathlib import Path

from moekit.errors import ConfigError

# What marks a folder as a training run (its checkpoints and history must not be mixed with other output).
RUN_MARKERS = ("run.json", "metrics.jsonl")


def check_output_folder(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> None:
    """Check, before any work, that a command may write its output into ``path`` (a missing folder is fine): an
    existing file, a training run folder, or (unless ``overwrite``) a non-empty folder is a ConfigError that
    says what to do instead."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; give a folder to write into")
    if folder.is_dir():
        marker = next((m for m in RUN_MARKERS if (folder / m).exists()), None)
        if marker is not None:
            raise ConfigError(f"{flag} {folder} is a training run (it holds {marker}); choose another {flag}")
        if not overwrite and any(folder.iterdir()):
            raise ConfigError(f"{flag} {folder} is not empty; choose another {flag}, or pass --overwrite")
