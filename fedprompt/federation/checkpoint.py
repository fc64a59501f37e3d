"""Checkpoints and run files: atomic writes (a temporary file in the same folder, then a rename) with the usual
permissions, safe loading, and the checks that a checkpoint fits the config that resumes it.

A checkpoint records the method's name, its hyperparameters (``method_hparams``) and the shape of every client state
key (``shapes``). :func:`check_resume` compares the first two with the config before anything is loaded;
:func:`check_shapes` compares the shapes with the freshly built client before any state is restored.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from fedprompt.errors import FedPromptError


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Save a checkpoint dict atomically (loadable with ``torch.load(path, weights_only=True)``)."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a fedprompt checkpoint with ``weights_only=True``; a missing, damaged or foreign file is one clear
    error (never a suggestion to load it unsafely)."""
    path = Path(path)
    if not path.is_file():
        raise FedPromptError(f"--resume: checkpoint file not found: {path}")
    not_ours = (f"--resume: {path} is not a fedprompt checkpoint (or it is damaged); pass the "
                "checkpoints/last.ckpt of a fedprompt run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's message suggests weights_only=False: never load a foreign file that way
        raise FedPromptError(not_ours) from None
    if not isinstance(state, dict):
        raise FedPromptError(not_ours)
    for key in ("round", "global", "clients"):
        if key not in state:
            raise FedPromptError(f"--resume: {path} is not a fedprompt checkpoint (no '{key}' entry).")
    return state


def state_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """``{key: shape}`` of a client state (what a checkpoint records as ``shapes``)."""
    return {key: list(value.shape) for key, value in state.items()}


def check_resume(checkpoint: dict, path: str | os.PathLike, method_name: str, hparams: dict) -> None:
    """Before anything loads: the checkpoint must come from the config's method with the same hyperparameters
    (``n_ctx``, ``csc``, ``lr``, ...: a resumed run continues the same run). One line on a mismatch."""
    fix = ("resume with the run's own config (leave out --config: it is read from the run's hyperparameters.yaml), "
           "or start a new run with another --out_dir.")
    saved = checkpoint.get("method")
    if saved is not None and saved != method_name:
        raise FedPromptError(f"--resume: {path} is a {saved} checkpoint but the config's method is {method_name}; "
                             + fix)
    saved_hparams = checkpoint.get("method_hparams")
    if saved_hparams is None:  # a checkpoint from before hyperparameters were recorded: shapes are still checked
        return
    changed = [f"{key}={saved_hparams.get(key)!r} in the checkpoint, {hparams.get(key)!r} in the config"
               for key in sorted(set(saved_hparams) | set(hparams)) if saved_hparams.get(key) != hparams.get(key)]
    if changed:
        raise FedPromptError(f"--resume: {path} was trained with other {method_name} settings (method."
                             + "; method.".join(changed) + "); " + fix)


def check_shapes(checkpoint: dict, path: str | os.PathLike, expected: dict[str, list[int]]) -> None:
    """The checkpoint's client states must have exactly the keys and shapes of the client this config builds
    (e.g. the same n_ctx, backbone width and number of classes). One line on a mismatch."""
    clients = checkpoint["clients"]
    saved = checkpoint.get("shapes") or (state_shapes(next(iter(clients.values()))) if clients else {})
    if saved == expected:
        return
    diff = [f"{key}: {saved.get(key)} in the checkpoint, {expected.get(key)} in this config"
            for key in sorted(set(saved) | set(expected)) if saved.get(key) != expected.get(key)]
    raise FedPromptError(f"--resume: the prompt shapes of {path} do not match this config ({'; '.join(diff)}); "
                         "resume with the run's own config (its hyperparameters.yaml: same backbone, data and "
                         "method).")


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
