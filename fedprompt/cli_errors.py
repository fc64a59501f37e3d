"""Readable command-line errors: one line naming the file or flag, the key, the value and what it must be.

jsonargparse validates every value against its type and reports the first failure as a multi-line text. fedprompt
does not read that text. Instead, when parsing fails, :func:`explain_argument_error` finds the argument at fault
by parsing again with the arguments given one more at a time (the config files, then each flag, with jsonargparse's
public parser), and checks that argument against the typed settings themselves (the fields of the method's
dataclass, of the argument groups in :mod:`fedprompt.args`, and the data reader's signature). YAML syntax errors in
a config file and in a flag's inline YAML value are found before parsing (:func:`check_config_files`,
:func:`check_inline_values`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import typing
from argparse import ArgumentError

import yaml

from fedprompt.config_keys import setting_keys
from fedprompt.errors import FedPromptError
from fedprompt.files import read_yaml, yaml_problem
from fedprompt.methods import METHODS
from fedprompt.methods.catalog import MethodSpec, method_spec
from fedprompt.methods.method import Method

#: top-level run settings that select a class by class_path (their settings are ``<key>.<name>``)
CLASS_KEYS = ("method", "data")


# ------------------------------------------------------------------------------------------------ config files
def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` files named in ``argv`` (``--config FILE`` or ``--config=FILE``), in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(argv: list[str]) -> None:
    """Each ``--config`` file exists and holds a mapping of plain YAML (:func:`fedprompt.files.read_yaml`);
    otherwise one :class:`FedPromptError` naming the file (and the line and column of a syntax error or of a tag
    that would build a Python object)."""
    for name in config_files(argv):
        read_config(name)


def read_config(name: str) -> dict:
    """The settings of ``--config name`` (a mapping), or one line naming the file and what is wrong."""
    if not os.path.exists(name):
        raise FedPromptError(f"--config {name}: no such file.")
    return read_yaml(name, f"--config {name}", "fix the file")


def inline_values(argv: list[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` of every flag in ``argv`` whose value is inline YAML (a mapping or list: it starts with ``{``
    or ``[``), as ``--flag VALUE`` or ``--flag=VALUE``."""
    found = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg == "--config" or arg.startswith("--config="):
            continue
        flag, equals, value = arg.partition("=")
        if not equals and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        if value.lstrip().startswith(("{", "[")):
            found.append((flag, value))
    return found


def check_inline_values(argv: list[str]) -> None:
    """Each inline YAML value of a flag (``--federation '{rounds: 3}'``) is valid YAML; otherwise one
    :class:`FedPromptError` naming the flag, the value and where its syntax breaks."""
    for flag, value in inline_values(argv):
        try:
            yaml.safe_load(value)
        except yaml.YAMLError as err:
            hint = (f"an inline mapping is written '{{key: value, ...}}', or give its settings as flags, {flag}.KEY "
                    "VALUE" if value.lstrip().startswith("{") else "an inline list is written '[a, b, ...]'")
            raise FedPromptError(f"{flag} {value}: {yaml_problem(err, lines=False)} ({hint}).") from None


# ------------------------------------------------------------------------------------------------------ types
def describe(annotation) -> str:
    """A type annotation in words (``int`` -> "an integer", ``Optional[float]`` -> "a number or null", ...)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0])} values" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def matches(value, annotation) -> bool:
    """Whether a (YAML-loaded) ``value`` fits ``annotation``; classes and unknown types are not checked."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(matches(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(matches(v, args[0]) for v in value) if args else True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # a finite number (the parser takes "1e-3" but not "nan")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    return True


# --------------------------------------------------------------------------------------------------- settings
def _dataclass_settings(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls) if f.name != "resolved_config"}


def _init_settings(cls) -> dict[str, object]:
    """The keyword parameters of ``cls.__init__`` and of the ``__init__`` of its bases (readers pass ``**kwargs`` on)
    with their annotations."""
    out: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - an annotation that cannot be resolved is simply not checked
            hints = {}
        for name, param in inspect.signature(init).parameters.items():
            if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                out[name] = hints.get(name, typing.Any)
    return out


def settings_of(cls) -> dict[str, object]:
    """``{setting: annotation}`` of a settings class (a dataclass, a class with a typed ``__init__``, or one of
    fedprompt's methods as its source defines it: :class:`~fedprompt.methods.catalog.MethodSpec`)."""
    if isinstance(cls, MethodSpec):
        return {name: setting.annotation for name, setting in cls.settings.items()}
    return _dataclass_settings(cls) if dataclasses.is_dataclass(cls) else _init_settings(cls)


def resolve_class(value, base: type) -> type | MethodSpec | None:
    """The class a ``class_path`` value names (a dotted path, or a short name of an imported subclass of ``base``);
    one of fedprompt's methods as its source defines it (:func:`~fedprompt.methods.catalog.method_spec`: nothing
    is imported, so no torch)."""
    path = value.get("class_path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        return None
    if base is Method and method_spec(path) is not None:
        return method_spec(path)
    if "." in path:
        module, _, name = path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None
        return found if isinstance(found, type) else None
    todo = list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__name__ == path:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def class_names(base: type) -> list[str]:
    """The public subclasses of ``base`` that are imported (their short names); for methods, fedprompt's methods
    too (imported or not)."""
    found, todo = set(METHODS if base is Method else ()), list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and getattr(cls, "client_class", True) is not None:
            found.add(cls.__name__)
    return sorted(found)


def _bases() -> dict[str, type]:
    from fedprompt.data.reader import FederatedData

    return {"method": Method, "data": FederatedData}


def _class_in(annotation) -> type | None:
    """The fedprompt class a class-typed setting takes (``Optional[Partitioner]`` -> ``Partitioner``), else
    ``None``."""
    if isinstance(annotation, type):
        return annotation if annotation.__module__.startswith("fedprompt.") else None
    if typing.get_origin(annotation) is typing.Union or str(typing.get_origin(annotation)) == \
            "<class 'types.UnionType'>":
        found = [c for c in (_class_in(a) for a in typing.get_args(annotation)) if c is not None]
        return found[0] if len(found) == 1 else None
    return None


def _base_at(prefix: str, selected: dict) -> type | None:
    """The base class of the class-valued setting ``prefix`` (``method``, ``data``, ``data.partition``, ...)."""
    if prefix in CLASS_KEYS:
        return _bases()[prefix]
    parent, _, name = prefix.rpartition(".")
    owner = _class_at(parent, selected) if parent else None
    return _class_in(settings_of(owner).get(name)) if owner is not None else None


def _class_at(prefix: str, selected: dict) -> type | None:
    """The class chosen so far for the class-valued setting ``prefix`` (from ``selected``: prefix -> class_path)."""
    base = _base_at(prefix, selected)
    return resolve_class(selected.get(prefix), base) if base is not None and prefix in selected else None


def check_setting(key: str, value, selected: dict, groups: dict[str, type], text: str | None = None) -> str | None:
    """What is wrong with setting ``key`` (dotted, without ``init_args``) = ``value`` (YAML-loaded), or ``None``
    when nothing is found. ``selected`` maps the class-valued settings chosen so far (``method``, ``data``,
    ``data.partition``, ...) to their class_path value; ``groups`` maps the other top-level keys to their settings
    class (or the annotation of a plain top-level setting). ``text``: the value as typed on the command line (a
    string setting takes it as it is: ``--log.run_name 3``)."""
    head, _, rest = key.partition(".")
    if key.endswith(".class_path"):
        return check_setting(key[: -len(".class_path")], value, selected, groups)

    def fits(annotation) -> bool:
        return matches(value, annotation) or (text is not None and matches(text, annotation))

    if head in CLASS_KEYS:
        base = _base_at(key, selected)
        if base is not None and isinstance(value, (str, dict)):  # a class-valued setting: the class must exist
            if resolve_class(value, base) is None:
                shown = value.get("class_path") if isinstance(value, dict) else value
                return (f"unknown {key} class {shown!r}; choose one of {', '.join(class_names(base))} (or a full "
                        "class_path)")
            return None
        if not rest:
            return None
        prefix, _, name = key.rpartition(".")
        cls = _class_at(prefix, selected)
        if cls is None:
            return None
        owner, settings = cls.__name__, settings_of(cls)
        rest = name
    elif head in groups and dataclasses.is_dataclass(groups[head]):
        if not rest or "." in rest:
            return None
        owner, settings = f"the {head} group", settings_of(groups[head])
    elif head in groups and not rest:
        return None if fits(groups[head]) else f"invalid value {value!r} (expected {describe(groups[head])})"
    elif head in groups and not dataclasses.is_dataclass(groups[head]) and matches({}, groups[head]):
        return None  # a key inside a mapping-valued setting (sweep's --slurm): the mapping's keys are its own
    else:
        return f"no such setting; the settings are {', '.join(sorted(groups) + list(CLASS_KEYS))}"
    if rest not in settings:
        return f"{owner} has no setting {rest!r}; its settings: {', '.join(settings)}"
    if not fits(settings[rest]):
        return f"invalid value {value!r} for {owner} (expected {describe(settings[rest])})"
    return None


# ------------------------------------------------------------------------------------------------ localising
def _units(args: list[str]) -> list[list[str]]:
    """The arguments as units: ``["--config", F]``, ``["--key", value]``, ``["--key=value"]``, ``[other]``."""
    units, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config="):
            units.append(["--config", arg.split("=", 1)[1]])
            i += 1
        elif arg.startswith("--") and "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
            units.append([arg, args[i + 1]])
            i += 2
        else:
            units.append([arg])
            i += 1
    return units


def _parses(parser, args: list[str]) -> bool:
    try:
        parser.parse_args(args)
    except (ArgumentError, FedPromptError, SystemExit):
        return False
    except Exception:  # noqa: BLE001 - anything else also means these arguments do not parse
        return False
    return True


def _collapsed(err: Exception, limit: int = 3) -> str:
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines[:limit]) or type(err).__name__


def _groups_of(command: str) -> dict[str, type]:
    import fedprompt.run

    groups = {}
    for cls in (fedprompt.run.RunArgs, fedprompt.run.COMMAND_OPTIONS[command]):
        if cls is not None:
            groups.update({k: v for k, v in settings_of(cls).items()
                           if k not in CLASS_KEYS and k not in getattr(cls, "not_flags", ())})
    return groups


def _class_paths(tree, prefix: str = "") -> dict:
    """``{dotted key: class_path}`` of every class chosen in a config mapping (``data``, ``data.partition``)."""
    out = {}
    if isinstance(tree, dict):
        if "class_path" in tree and prefix:
            out[prefix] = tree["class_path"]
        for key, value in tree.items():
            if key == "init_args":
                out.update(_class_paths(value, prefix))
            elif key != "class_path":
                out.update(_class_paths(value, f"{prefix}.{key}" if prefix else key))
    return out


def _selected_in(args: list[str]) -> dict:
    """The classes chosen so far by config files and flags: ``{"method": ..., "data": ..., "data.partition": ...}``."""
    selected: dict = {}
    for unit in _units(args):
        if unit[0] == "--config" and len(unit) == 2:
            tree = read_config(unit[1])
            for prefix, path in _class_paths(tree).items():
                if prefix.split(".")[0] in CLASS_KEYS:
                    selected = {k: v for k, v in selected.items() if not k.startswith(prefix + ".")}
                    selected[prefix] = path
            continue
        key = unit[0][2:].split("=", 1)[0].replace(".init_args.", ".")
        if key.endswith(".class_path"):
            key = key[: -len(".class_path")]
        if key.split(".")[0] in CLASS_KEYS and len(unit) <= 2:
            value = unit[1] if len(unit) == 2 else unit[0].split("=", 1)[1] if "=" in unit[0] else None
            try:
                base = _base_at(key, selected)
            except Exception:  # noqa: BLE001 - an unknown parent class: nothing chosen
                base = None
            if base is not None and isinstance(value, str) and resolve_class(value, base) is not None:
                selected = {k: v for k, v in selected.items() if not k.startswith(key + ".")}
                selected[key] = value
    return selected


def _config_problem(name: str, selected: dict, groups: dict[str, type]) -> str | None:
    """``KEY: what is wrong`` for the first setting of config file ``name`` that is wrong, else ``None``
    (``selected``: the classes chosen before this file)."""
    tree = read_config(name)
    selected = {**selected, **_selected_in(["--config", name])}
    for key, value in setting_keys(tree).items():
        if value == {}:  # an empty group sets nothing
            continue
        problem = check_setting(key, value, selected, groups)
        if problem:
            return f"{key}: {problem}"
    return None


def _flag_problem(unit: list[str], selected: dict, groups: dict[str, type]) -> tuple[str, str | None]:
    """The flag as typed and what is wrong with it (``None``: nothing found); an inline mapping is checked key by
    key."""
    flag, _, inline = unit[0].partition("=")
    text = unit[1] if len(unit) == 2 else inline
    key = flag[2:].replace(".init_args.", ".")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    shown = f"{flag} {text}".strip()
    if isinstance(value, dict) and value:
        for sub, sub_value in setting_keys(value, key + ".").items():
            problem = check_setting(sub, sub_value, selected, groups)
            if problem:
                return shown, f"{sub}: {problem}"
        return shown, None
    return shown, check_setting(key, value, selected, groups, text)


#: arguments the settings check leaves to jsonargparse (help and config printing)
NOT_SETTINGS = ("--print_config", "--help", "-h")


def _is_setting(unit: list[str]) -> bool:
    """Whether an argument unit sets a setting to a value (not a help request, a positional or a bare flag)."""
    flag = unit[0].partition("=")[0]
    return (flag.startswith("--") and flag not in NOT_SETTINGS and not flag.endswith(".help")
            and (len(unit) == 2 or "=" in unit[0]))


def check_arguments(command: str, args: list[str]) -> dict:
    """Check ``fedprompt COMMAND ARGS`` before anything heavy is imported (no torch, no Lightning): every config file
    exists and holds plain YAML, and every setting of the files and flags, in order, is a setting of its group, of
    the chosen data reader or of the chosen method (read from its source: :mod:`fedprompt.methods.catalog`), with a
    value of its type. The first problem is one :class:`FedPromptError` line naming the file or flag, the key, the
    value and what it must be. Returns the classes the arguments choose (``{"method": ..., "data": ...}``).

    Value ranges are checked later, when the settings are built (their ``__post_init__``)."""
    hint = f". See: fedprompt {command} --help"
    groups = _groups_of(command)
    units = _units(args)
    for i, unit in enumerate(units):
        selected = _selected_in([a for u in units[:i] for a in u])
        if unit[0] == "--config" and len(unit) == 2:
            problem = _config_problem(unit[1], selected, groups)
            if problem:
                raise FedPromptError(f"--config {unit[1]}: {problem}{hint}")
        elif _is_setting(unit):
            shown, problem = _flag_problem(unit, selected, groups)
            if problem:
                raise FedPromptError(f"{shown}: {problem}{hint}")
    return _selected_in(args)


def explain_argument_error(err: Exception, argv: list[str], subparsers: dict) -> str:
    """One line for a parse failure: the config file or flag at fault, the key, the value and what it must be."""
    command = argv[0] if argv and argv[0] in subparsers else None
    hint = f". See: fedprompt {command or ''} --help".replace("  ", " ").rstrip()
    if command is None:
        return f"unknown or missing command; choose one of {', '.join(subparsers)}{hint}"
    parser, args = subparsers[command], argv[1:]
    units = _units(args)
    groups = _groups_of(command)
    for i, unit in enumerate(units):
        done = [a for u in units[: i + 1] for a in u]
        if _parses(parser, done):
            continue
        selected = _selected_in([a for u in units[:i] for a in u])
        if unit[0] == "--config":
            problem = _config_problem(unit[1], selected, groups)
            return f"--config {unit[1]}: {problem or _collapsed(err)}{hint}"
        shown, problem = _flag_problem(unit, selected, groups)
        return f"{shown}: {problem or _collapsed(err)}{hint}"
    return f"{_collapsed(err)}{hint}"
