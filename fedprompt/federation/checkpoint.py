"""Atomic writes for checkpoints and result files: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from fedprompt.errors import FedPromptError


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Save a checkpoint dict atomically (loadable with ``torch.load(path, weights_only=True)``)."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a fedprompt checkpoint with ``weights_only=True``; a missing or broken file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FedPromptError(f"--resume: checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FedPromptError(f"--resume: cannot read checkpoint {path}: {err}") from None
    for key in ("round", "global", "clients"):
        if key not in state:
            raise FedPromptError(f"--resume: {path} is not a fedprompt checkpoint (missing '{key}').")
    return state


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically."""
    data = json.dumps(obj, indent=2, sort_keys=False).encode()
    _atomic_write(Path(path), lambda handle: handle.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file (empty if absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
