"""A run directory belongs to one run, and has one writer.

``fit`` and ``zeroshot`` refuse to write into a folder that holds another run (one line naming the folder and what to
do: ``--resume``, another ``--out_dir``, or ``--overwrite true``, which deletes that run's files once the new run's
checks passed); a resumed ``fit`` continues in the folder of its checkpoint; ``evaluate`` writes ``eval.json`` beside
the checkpoint's run.

While a command writes a run directory it holds :class:`RunLock` on ``DIR/.fedprompt.lock`` (``fcntl.flock``: the
operating system releases it when the process ends, also after ``kill -9``), so a second command on the same folder
stops with one line naming the process that writes it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

from fedprompt.errors import FedPromptError
from fedprompt.files import read_yaml

#: what fedprompt writes into a run directory (all of it, and nothing else, goes with --overwrite true)
RUN_FILES = ("hyperparameters.yaml", "metrics.jsonl", "summary.json", "eval.json", "bad_images.txt",
             "checkpoints", "csv", "tensorboard", "wandb")
#: the lock file of the process writing a run directory (not a run file: --overwrite keeps it)
LOCK_FILE = ".fedprompt.lock"
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
        config = read_yaml(folder / "hyperparameters.yaml")
        method = f"a {config['method']['class_path'].rsplit('.', 1)[-1]} run"
    except (FedPromptError, KeyError, TypeError, AttributeError):
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
    """Delete the run files of ``folder`` (:data:`RUN_FILES`), nothing else (``--overwrite true``, once the new
    run's checks passed)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def resume_command(folder: Path) -> str:
    """The command that continues the run in ``folder`` (its config is read from hyperparameters.yaml)."""
    return f"fedprompt fit --resume {shlex.quote(str(folder / 'checkpoints' / 'last.ckpt'))}"


class RunLock:
    """The one-writer lock of a run directory: an exclusive ``fcntl.flock`` on ``DIR/.fedprompt.lock``, which holds
    the writer's process id, host, start time and command line (to name it to a second writer).

    The operating system releases the lock when the process ends, however it ends, so a killed run can be resumed at
    once. :meth:`release` deletes the lock file; a process that locked the file just before it was deleted sees that
    the path no longer names the file it holds and locks the new one, so two processes never both hold the folder.
    """

    def __init__(self, folder: Path, name: str = LOCK_FILE):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; ``None`` on success, else one line naming the process that holds it (or why the lock
        file cannot be written)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock (one writer is then up to the user)
            return None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                return f"out_dir {self.folder}: cannot create its lock file {self.path} ({err.strerror or err})."
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                return (f"out_dir {self.folder} is in use: {holder} is writing to it; wait for it to finish, stop it "
                        "(its run can then be resumed), or choose another --out_dir.")
            except OSError as err:  # a file system without locks
                os.close(fd)
                from fedprompt.errors import warn

                warn(f"out_dir {self.folder}: cannot lock {self.path} ({err.strerror or err}); a second run on this "
                     "folder would not be stopped.")
                return None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder deleted the file as we locked it: lock the current one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(shlex.quote(a) for a in ["fedprompt", *sys.argv[1:]])}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except OSError as err:
            os.close(fd)
            return f"out_dir {self.folder}: cannot write its lock file {self.path} ({err.strerror or err})."
        self._fd = fd
        return None

    def release(self) -> None:
        """Delete the lock file and release the lock (nothing if it is not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> str:
    """The process named in a lock file: ``process 123 on host (started ..., fedprompt fit ...)``."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
    extra = ", ".join(str(info[k]) for k in ("started", "command") if info.get(k))
    return f"process {info['pid']}{where}" + (f" ({extra})" if extra else "")
