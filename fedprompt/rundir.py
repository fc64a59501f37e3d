"""A run directory belongs to one run.

``fit`` and ``zeroshot`` refuse to write into a folder that holds another run (one line naming the folder and what to
do: ``--resume``, another ``--out_dir``, or ``--overwrite true``, which deletes that run's files first); a resumed
``fit`` continues in the folder of its checkpoint; ``evaluate`` writes ``eval.json`` beside the checkpoint's run.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import yaml

#: what fedprompt writes into a run directory (all of it, and nothing else, goes with --overwrite true)
RUN_FILES = ("hyperparameters.yaml", "metrics.jsonl", "summary.json", "eval.json", "bad_images.txt",
             "checkpoints", "csv", "tensorboard", "wandb")
#: results whose presence means the folder holds a run (a lone hyperparameters.yaml, left by a run stopped before
#: its first round, holds nothing to lose)
MARKERS = ("summary.json", "eval.json", "checkpoints/last.ckpt")


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run directory of ``DIR/checkpoints/<name>.ckpt`` (``DIR``); ``None`` for a checkpoint elsewhere."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same folder (resolved, so ``runs/x`` and ``./runs/x/`` match)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds results of a fedprompt run (a summary, an evaluation, a checkpoint or a metrics
    row)."""
    metrics = folder / "metrics.jsonl"
    return any((folder / name).exists() for name in MARKERS) or (metrics.is_file() and metrics.stat().st_size > 0)


def describe(folder: Path) -> str:
    """A few words on the run in ``folder``: its method and how far it got, from its files."""
    method = "a run"
    try:
        config = yaml.safe_load((folder / "hyperparameters.yaml").read_text()) or {}
        method = f"a {config['method']['class_path'].rsplit('.', 1)[-1]} run"
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        pass
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return f"{method} with checkpoints/last.ckpt"
    if (folder / "summary.json").is_file():
        return f"{method} with summary.json"
    return f"{method} without a checkpoint"


def not_writable(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written to (``None`` if it can): one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"out_dir {folder} is a file, not a folder; pass --out_dir with a folder path."
    except NotADirectoryError:
        return f"out_dir {folder}: a part of this path is a file, not a folder; pass --out_dir with a folder path."
    except OSError as err:
        return f"out_dir {folder} cannot be created ({err.strerror or err}); pass --out_dir with a writable place."
    if not folder.is_dir():
        return f"out_dir {folder} is a file, not a folder; pass --out_dir with a folder path."
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"out_dir {folder} is not writable; pass --out_dir with a writable place."
    return None


def claim_problem(folder: Path, mode: str, resume: str | None, overwrite: bool) -> str | None:
    """Why ``mode`` (``fit``, ``zeroshot``, ``evaluate``) must not write into ``folder`` (``None`` if it may).

    A resumed fit continues in its checkpoint's run directory; a new fit or zero-shot run needs a folder without
    another run (or ``overwrite``); evaluate writes beside the checkpoint's run, or into a folder without a run.
    """
    origin = run_dir_of(resume) if resume else None
    if mode == "fit" and origin is not None:
        if not same_folder(folder, origin):
            return (f"--out_dir {folder} is not the run directory of --resume ({origin}): a resumed run continues "
                    f"in its own folder; leave out --out_dir (or pass --out_dir {origin}).")
        return None
    if mode == "evaluate" and origin is not None and same_folder(folder, origin):
        return None
    if not folder.exists() or not holds_run(folder) or (mode != "evaluate" and overwrite):
        return None
    what = describe(folder)
    if mode == "evaluate":
        return (f"out_dir {folder} holds another run ({what}); evaluate writes eval.json beside the run of the "
                "checkpoint: leave out --out_dir, or choose a folder without a run.")
    advice = "choose another --out_dir, or pass --overwrite true to delete that run and start again"
    last = folder / "checkpoints" / "last.ckpt"
    if mode == "fit" and last.is_file():
        advice = f"pass --resume {shlex.quote(str(last))} to continue it, " + advice
    return f"out_dir {folder} already holds a run ({what}); {advice}."


def clear(folder: Path) -> None:
    """Delete the run files of ``folder`` (:data:`RUN_FILES`), nothing else (``--overwrite true``)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def resume_command(folder: Path) -> str:
    """The command that continues the run in ``folder`` (its config is read from hyperparameters.yaml)."""
    return f"fedprompt fit --resume {shlex.quote(str(folder / 'checkpoints' / 'last.ckpt'))}"
