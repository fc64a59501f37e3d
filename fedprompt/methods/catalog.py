"""The methods' settings, read from their source files without importing them.

A method's settings are the fields of its dataclass (:mod:`fedprompt.methods.method`), and a method module also
defines its client, a Lightning module: importing it loads torch and Lightning (seconds). The command line checks a
config's method settings (names and types), prints ``--method.help NAME`` and lists the methods before that, from
the class definitions in the source (:mod:`ast`): the same fields, annotations, defaults and attribute docstrings,
with the inherited ones (a base in the same module, in another method module, or :class:`~fedprompt.methods.method.
TrainedMethod`). ``tests/test_cli.py`` checks that this reading equals the imported classes' fields for every method.

Plain Python only: no method module is imported here.
"""

from __future__ import annotations

import ast
import importlib.util
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from fedprompt.methods import METHODS, REGISTRY

#: names an annotation may use, as the method modules import them
TYPE_NAMES = {"Any": Any, "ClassVar": ClassVar, "Literal": Literal, "Optional": Optional, "Union": Union,
              "bool": bool, "int": int, "float": float, "str": str, "list": list, "dict": dict, "tuple": tuple,
              "frozenset": frozenset, "None": None}


@dataclass
class Setting:
    """One setting of a method: its annotation (``typing.Any`` where the source names a type that is not plain
    data), its default as written in the source, and its attribute docstring."""

    name: str
    annotation: Any
    default: str | None
    doc: str = ""


@dataclass
class MethodSpec:
    """A method class as its source defines it: its name, module, docstring and settings (inherited first, in
    dataclass field order)."""

    name: str
    module: str
    doc: str
    settings: dict[str, Setting] = field(default_factory=dict)

    @property
    def __name__(self) -> str:  # named like the class it describes (messages say "PromptFL has no setting ...")
        return self.name

    @property
    def class_path(self) -> str:
        return f"fedprompt.methods.{self.name}"


class _Names(dict):
    """The namespace annotations are evaluated in: plain types and the module's aliases; any other name is
    ``Any``."""

    def __missing__(self, key):
        return _Unknown()


class _Unknown:
    """An unknown name in an annotation (``torch.Tensor``): any attribute or union of it is still unknown."""

    def __getattr__(self, name):
        return self

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __getitem__(self, item):
        return self


def _annotation(source: str, aliases: dict) -> Any:
    try:
        value = eval(source, {"__builtins__": {}}, _Names({**TYPE_NAMES, **aliases}))  # noqa: S307 - no builtins
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate is simply not checked
        return Any
    return Any if isinstance(value, _Unknown) or _has_unknown(value) else value


def _has_unknown(annotation) -> bool:
    return any(isinstance(a, _Unknown) or _has_unknown(a) for a in typing.get_args(annotation))


@lru_cache(maxsize=None)
def _module(module: str) -> tuple[dict[str, ast.ClassDef], dict[str, str], dict]:
    """The classes, the names imported from other method modules and the type aliases of ``fedprompt.methods.
    <module>``, from its source."""
    spec = importlib.util.find_spec(f"fedprompt.methods.{module}")
    tree = ast.parse(Path(spec.origin).read_text())
    classes, imported, aliases = {}, {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = node
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedprompt.methods."):
            imported.update({a.asname or a.name: node.module.rsplit(".", 1)[1] for a in node.names})
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _annotation(ast.unparse(node.value), aliases)
            if typing.get_origin(value) is Literal:
                aliases[node.targets[0].id] = value
    return classes, imported, aliases


def _is_init_field(node: ast.AnnAssign) -> bool:
    """A dataclass field set by ``__init__`` (not a ``ClassVar``, not ``field(init=False)``)."""
    if ast.unparse(node.annotation).startswith(("ClassVar", "typing.ClassVar")):
        return False
    value = node.value
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        return not any(k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                       for k in value.keywords)
    return True


def _default(node: ast.AnnAssign) -> str | None:
    value = node.value
    if value is None:
        return None
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        for keyword in value.keywords:
            if keyword.arg == "default":
                return ast.unparse(keyword.value)
            if keyword.arg == "default_factory":
                factory = keyword.value
                return ast.unparse(factory.body if isinstance(factory, ast.Lambda) else factory) + "()" * (
                    not isinstance(factory, ast.Lambda))
        return None
    return ast.unparse(value)


def _own_settings(node: ast.ClassDef, aliases: dict) -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    body = node.body
    for i, item in enumerate(body):
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)) or not _is_init_field(item):
            continue
        doc = ""
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = " ".join(after.value.value.split())
        out[item.target.id] = Setting(item.target.id, _annotation(ast.unparse(item.annotation), aliases),
                                      _default(item), doc)
    return out


@lru_cache(maxsize=None)
def _class_settings(module: str, name: str) -> dict[str, Setting]:
    """The settings of class ``name`` of ``fedprompt.methods.<module>`` in a dataclass's field order: the bases'
    fields (in reverse method resolution order), then its own new ones."""
    classes, imported, aliases = _module(module)
    node = classes[name]
    out: dict[str, Setting] = {}
    for base in reversed(node.bases):
        base_name = ast.unparse(base)
        if base_name in classes:
            inherited = _class_settings(module, base_name)
        elif base_name in imported:
            inherited = _class_settings(imported[base_name], base_name)
        else:
            continue
        out.update({k: v for k, v in inherited.items() if k not in out})
    out.update(_own_settings(node, aliases))  # a redefined field keeps its place, as in a dataclass
    return out


def _class_name(value: str) -> str | None:
    """The method a ``--method`` value names, when it is one of fedprompt's (a short name, ``fedprompt.methods.X``
    or ``fedprompt.methods.<module>.X``); else ``None``."""
    if value in METHODS:
        return value
    prefix, _, name = value.rpartition(".")
    if name in METHODS and prefix in ("fedprompt.methods", f"fedprompt.methods.{REGISTRY[name]}"):
        return name
    return None


def method_spec(value) -> MethodSpec | None:
    """The :class:`MethodSpec` of a method value (a short name, a class_path string, or a mapping with
    ``class_path``) when it is one of fedprompt's methods; ``None`` for any other value (a user's class)."""
    path = value.get("class_path") if isinstance(value, dict) else value
    name = _class_name(path) if isinstance(path, str) else None
    if name is None:
        return None
    module = REGISTRY[name]
    node = _module(module)[0][name]
    return MethodSpec(name, module, ast.get_docstring(node) or "", dict(_class_settings(module, name)))


def _type_text(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default_text(source: str | None) -> str:
    if source is None:
        return "required"
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _metavar(setting: Setting) -> str:
    annotation = setting.annotation
    if annotation is bool:
        return "{true,false}"
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    return setting.name.upper()


def method_help(spec: MethodSpec, prog: str) -> str:
    """``--method.help NAME``: the method's settings with their types, defaults and docstrings, as ``--help`` prints
    them (``prog``: the command, e.g. ``fedprompt fit``)."""
    import argparse

    summary = " ".join(spec.doc.split("\n\n")[0].split()).rstrip(".")
    parser = argparse.ArgumentParser(prog=prog, add_help=False,
                                     description=f"Help for --method.help={spec.class_path}",
                                     formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=26))
    group = parser.add_argument_group(summary.replace("%", "%%"))
    for setting in spec.settings.values():
        extra = f"type: {_type_text(setting.annotation)}, default: {_default_text(setting.default)}"
        group.add_argument(f"--method.{setting.name}", metavar=_metavar(setting),
                           help=f"{setting.doc} ({extra})".strip().replace("%", "%%"))
    return parser.format_help()
