"""Load data pickles without running code from them.

``pickle.load`` can call any importable function named in the file (``os.system``, ``subprocess.Popen``, ...),
so opening a downloaded pickle with it is as dangerous as running a downloaded script. The FedBN split files
(``DomainNet/<site>_train.pkl``, ``office_caltech_10/<site>_test.pkl``) are such downloads: each holds a pair
(image paths, text labels) as Python lists or numpy arrays, nothing else.

:func:`safe_load` reads them with :class:`RestrictedUnpickler`, which resolves only the few globals that plain
containers and numpy arrays need (``list``, ``tuple``, ``dict``, ``set``, ``str``, numpy's array/dtype/scalar
reconstructors, ...). Any other global — a function, a class, a module attribute — is refused with a
:class:`~fedprompt.errors.FedPromptError` naming the file and the refused global, before anything is called.
The allowed names are mapped to fixed objects here; the module a pickle names is never imported.
"""

from __future__ import annotations

import codecs
import importlib
import io
import os
import pickle
from pathlib import Path

from fedprompt.errors import FedPromptError

# Built-in types that plain data pickles reference by name (protocols 0-2 name set/frozenset/bytearray; protocol
# 2 pickles of bytes go through ``_codecs.encode``). Python 2 pickles spell the module ``__builtin__``.
_BUILTINS = {name: getattr(__import__("builtins"), name) for name in
             ("list", "tuple", "dict", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool",
              "complex", "slice", "range")}

# numpy's own reconstructors, under the module names numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) write.
_NUMPY_FUNCTIONS = {
    "multiarray": ("_reconstruct", "scalar"),
    "numeric": ("_frombuffer",),
}


def _numpy_allowed() -> dict[tuple[str, str], object]:
    import numpy as np

    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for submodule, names in _NUMPY_FUNCTIONS.items():
        module = None
        for package in ("numpy._core", "numpy.core"):
            try:
                module = importlib.import_module(f"{package}.{submodule}")
                break
            except ImportError:
                continue
        if module is None:  # pragma: no cover - every numpy has one of the two
            continue
        for name in names:
            if hasattr(module, name):
                for package in ("numpy._core", "numpy.core"):
                    allowed[(f"{package}.{submodule}", name)] = getattr(module, name)
    return allowed


def allowed_globals() -> dict[tuple[str, str], object]:
    """The ``(module, name)`` pairs a data pickle may reference, mapped to the objects they resolve to."""
    allowed: dict[tuple[str, str], object] = {}
    for name, obj in _BUILTINS.items():
        allowed[("builtins", name)] = obj
        allowed[("__builtin__", name)] = obj
    allowed[("_codecs", "encode")] = codecs.encode
    allowed.update(_numpy_allowed())
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only :func:`allowed_globals` (containers, strings, numbers, numpy
    arrays); any other global raises :class:`FedPromptError` naming ``source`` and the refused global.

    Args:
        file: a binary file object.
        source: the file's name for error messages.
    """

    def __init__(self, file, *, source: str = "<pickle>"):
        super().__init__(file, fix_imports=True, encoding="latin1")
        self.source = source
        self._allowed = allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise FedPromptError(
                f"{self.source}: refusing to load the pickle, it references '{module}.{name}', which a data file "
                "(lists or numpy arrays of paths and labels) never needs. The file is not a FedBN split file or "
                "was tampered with; download it again from the source named in docs/data.md.")
        return obj

    def persistent_load(self, pid):
        raise FedPromptError(f"{self.source}: refusing to load the pickle, it uses persistent ids ({pid!r}), which "
                             "a data file never needs.")


def safe_loads(data: bytes, source: str = "<bytes>"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; a corrupt pickle is a :class:`FedPromptError`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except FedPromptError:
        raise
    except Exception as err:  # UnpicklingError, EOFError, ValueError, ... from a damaged file
        raise FedPromptError(f"{source}: not a readable pickle ({type(err).__name__}: {err}); the file is damaged "
                             "or truncated, download it again.") from None


def safe_load(path: str | os.PathLike):
    """Read a pickle file with :class:`RestrictedUnpickler`.

    A missing file, a damaged file and a file that references anything beyond plain containers and numpy arrays
    each raise :class:`FedPromptError` naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedPromptError(f"pickle file not found: {path}") from None
    except OSError as err:
        raise FedPromptError(f"cannot read {path}: {err}") from None
    return safe_loads(data, str(path))
