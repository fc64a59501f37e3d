"""Every file fedprompt writes or reads back, through one checked path.

Writes are atomic (a temporary file in the same folder, flushed, then renamed over the target) with the usual
permissions; an ``OSError`` on the way (a full disk, a read-only or vanished folder, a path through a file) becomes one
:class:`~fedprompt.errors.FedPromptError` line naming the file, the reason and what was kept
(:func:`checked_writes`). Metrics rows are appended whole or not at all (:func:`append_jsonl`).

JSON is strict (RFC 8259): a number that is not finite (an epsilon without noise is infinite, a metric of a round in
which no client could be evaluated is NaN) is written ``null``, never the bare tokens ``Infinity`` or ``NaN`` that
strict parsers reject (:func:`dumps`). Readers of ``metrics.jsonl`` and ``summary.json`` take ``null`` as "no finite
value" (``fedprompt table`` shows it as a dash); files written by older versions with ``Infinity`` still read.

YAML is read with one safe loader (:func:`load_yaml`, :func:`read_yaml`): plain data only (mappings, lists, numbers,
strings); a syntax error or a tag that would build a Python object is one line naming the file, the line and column.

Plain Python only: the command line, ``fedprompt table`` and ``fedprompt sweep`` use this before torch loads.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import yaml

from fedprompt.errors import FedPromptError


# ------------------------------------------------------------------------------------------------------ JSON
def finite(value):
    """``value`` with every float that is not finite (``inf``, ``-inf``, ``nan``) replaced by ``None``, in nested
    dicts, lists and tuples (tuples become lists, as JSON has them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(obj, **kwargs) -> str:
    """Strict JSON of ``obj``: non-finite numbers as ``null`` (see the module docstring); other keyword arguments as
    :func:`json.dumps`."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def read_json(path: str | os.PathLike, fix: str, source: str | None = None) -> object:
    """The JSON value in ``path``; a missing, unreadable or damaged file is one line starting with ``source``
    (default: the path) and ending with ``fix`` (what the user should do)."""
    path = Path(path)
    who = source or str(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FedPromptError(f"{who} is missing; {fix}") from None
    except OSError as err:
        raise FedPromptError(f"{who}: cannot read it ({err.strerror or err}); {fix}") from None
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise FedPromptError(f"{who} is not valid JSON ({' '.join(str(err).split())}); {fix}") from None


# ------------------------------------------------------------------------------------------------------ YAML
TAG_FIX = "remove the tag"


def yaml_problem(err: yaml.YAMLError, lines: bool = True) -> str:
    """One line on a YAML error: what and where (``lines``: line and column, else the column only, for a one-line
    value); a tag that would build a Python object is named as such."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = ""
    if mark is not None:
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if lines else f" at column {mark.column + 1}"
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.split("tag", 1)[1].strip(" '\"").replace("tag:yaml.org,2002:", "!!")
        return (f"the tag {tag}{where} asks YAML for a Python object; fedprompt reads plain YAML only (mappings, "
                f"lists, numbers, strings, true/false, null): {TAG_FIX}")
    return f"YAML syntax error{where}: {problem}"


def load_yaml(text: str, source: str):
    """The plain data of YAML ``text`` (safe loader); an error is one line starting with ``source`` (a file, or a
    flag and its value)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise FedPromptError(f"{source}: {yaml_problem(err)}.") from None


def read_yaml(path: str | os.PathLike, source: str | None = None, fix: str = "fix the file", *,
              mapping: bool = True):
    """The plain data of the YAML file ``path`` (an empty file: ``{}``); a missing, unreadable or invalid file, or
    (with ``mapping``) one that does not hold a mapping, is one line starting with ``source`` (default: the path)
    and ending with ``fix``."""
    path = Path(path)
    source = source or str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FedPromptError(f"{source}: no such file.") from None
    except IsADirectoryError:
        raise FedPromptError(f"{source}: a folder, not a YAML file; {fix}.") from None
    except OSError as err:
        raise FedPromptError(f"{source}: cannot read it ({err.strerror or err}); {fix}.") from None
    except UnicodeDecodeError as err:
        raise FedPromptError(f"{source}: not UTF-8 text (byte {err.start}); {fix}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = yaml_problem(err)
        raise FedPromptError(f"{source}: {problem}" + ("." if problem.endswith(TAG_FIX) else f"; {fix}.")) from None
    if data is None:
        return {} if mapping else None
    if mapping and not isinstance(data, dict):
        raise FedPromptError(f"{source}: holds a {type(data).__name__}, not a mapping of settings; {fix}.")
    return data


# ------------------------------------------------------------------------------------------------------ writes
def write_problem(path: str | os.PathLike, err: OSError, kept: str) -> str:
    """One line on a failed write: the file, the reason (a full disk or quota said so) and ``kept`` (what is still
    there and what to do)."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (the disk or quota is full)"
    elif err.errno in (errno.EEXIST, errno.ENOTDIR):  # making the folders of a path that runs through a file
        reason = "a part of the path is a file, not a folder"
    culprit = f"; {err.filename}" if err.filename and str(err.filename) != str(path) else ""
    return f"cannot write {path} ({reason}{culprit}); {kept}"


@contextmanager
def checked_writes(path: str | os.PathLike, kept: str) -> Iterator[None]:
    """Writes of ``path`` (a file, or a folder and the files in it) inside the block: an ``OSError`` becomes one
    :class:`FedPromptError` line (:func:`write_problem`) saying what was ``kept``."""
    try:
        yield
    except OSError as err:
        raise FedPromptError(write_problem(path, err, kept)) from None


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Write ``path`` atomically: ``write(handle)`` fills a temporary file in the same folder (made with its parent
    folders), which is flushed to disk and renamed over ``path``. On any failure the temporary file is removed and
    ``path`` is as it was; the error propagates (an ``OSError`` for a full disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename survives a power cut); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically."""
    atomic_write(path, lambda handle: _write_handle(handle, data))


def _write_handle(handle, data: bytes) -> None:
    handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) atomically."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    """Write strict JSON (:func:`dumps`, indented) atomically."""
    write_bytes(path, dumps(obj, indent=2, sort_keys=False).encode())


def write_all(paths_and_data: list[tuple[Path, bytes]]) -> None:
    """Write several files so that either all of them are replaced or none: each goes to a temporary file first,
    and only when every one is on disk are they renamed over their targets (``fedprompt table``'s Markdown, CSV and
    figure). An ``OSError`` leaves every target as it was."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in paths_and_data:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as handle:
                _write_handle(handle, data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, file_mode())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


# ------------------------------------------------------------------------------------------------ JSON lines
def read_jsonl(path: str | os.PathLike, torn: list | None = None) -> list[dict]:
    """Rows of a JSON-lines file (empty if absent).

    A last line that is not a whole row (a write cut short by a crash or a full disk) is left out; when ``torn`` is
    given, that line is appended to it (so the caller can say so). A damaged line before the last is one error
    naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    last = max((number for number, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if number == last and not text.endswith("\n"):
                if torn is not None:
                    torn.append(line)
                continue
            raise FedPromptError(f"{path}: line {number} is not a JSON row ({line[:60]!r}); the file was changed "
                                 "by something else than fedprompt: restore it, or delete the line.") from None
        rows.append(row)
    return rows


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a short write is retried; a failed one raises ``OSError``)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one row (strict JSON) to a JSON-lines file so that it is whole or absent: one write, flushed to disk;
    if the write fails (e.g. the disk is full) the file is cut back to its previous end before the error is raised."""
    data = (dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # the torn row is then dropped on resume (read_jsonl)
            raise
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically (strict JSON)."""
    write_text(path, "".join(dumps(row) + "\n" for row in rows))
