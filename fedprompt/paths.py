"""Folders made for a run or a download, and their clean-up when the work fails before writing anything."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path


def missing_dirs(path: Path) -> list[Path]:
    """The folders of ``path`` (itself included) that do not exist yet, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return missing[::-1]


def make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the folders created, outermost first."""
    missing = missing_dirs(path)
    if missing:
        missing[-1].mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def remove_if_left_empty(folders: list[Path]):
    """If the block fails, remove the given folders (made for a download) that hold no file, so a failed download
    leaves nothing behind that looks like a dataset."""
    try:
        yield
    except BaseException:
        for folder in reversed(folders):
            if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)
        raise
