"""The ``fedprompt`` command line: ``fit``, ``evaluate``, ``zeroshot``, ``sweep``, ``partition``, ``bench``.

Every command takes ``--config FILE.yaml`` (flat YAML; ``class_path`` selects method and data), flags that override
it (``--data.root``, ``--federation.rounds``, ...) and ``--print_config``. ``fit`` and ``evaluate`` with ``--resume
DIR/checkpoints/last.ckpt`` and no ``--config`` read the run's own ``DIR/hyperparameters.yaml``.

Importing this module is cheap (no torch, Lightning or open_clip): the commands' modules are imported when the
parser is built, and the model and data only when a command runs.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path

from fedprompt.errors import FedPromptError

#: subcommands whose --resume names a run directory whose hyperparameters.yaml is the default config
RESUMING = ("fit", "evaluate")


def commands() -> dict:
    """Subcommand name -> function."""
    from fedprompt.bench import bench
    from fedprompt.fit import evaluate, fit, zeroshot
    from fedprompt.partition_table import partition
    from fedprompt.sweep import sweep

    return {"fit": fit, "evaluate": evaluate, "zeroshot": zeroshot, "sweep": sweep, "partition": partition,
            "bench": bench}


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in ``args`` (the last one wins), else ``None``."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def with_run_config(argv: list[str]) -> list[str]:
    """``fit|evaluate --resume DIR/checkpoints/X.ckpt`` without ``--config``: put ``--config DIR/hyperparameters.yaml
    --out_dir DIR`` right after the subcommand, so the run's own settings are the defaults that flags override."""
    from fedprompt.rundir import run_dir_of

    if not argv or argv[0] not in RESUMING:
        return argv
    rest = argv[1:]
    resume = _flag_value(rest, "--resume")
    if not resume or resume == "null" or _flag_value(rest, "--config") is not None:
        return argv
    run = run_dir_of(resume)
    config = run / "hyperparameters.yaml" if run is not None else None
    if config is None or not config.is_file():
        raise FedPromptError(f"--resume {resume}: no --config given and no hyperparameters.yaml in the run directory "
                             f"of the checkpoint ({config or Path(resume).parent / '..'}); pass the run's config "
                             "with --config.")
    return [argv[0], "--config", str(config), "--out_dir", str(run), *rest]


def _resolved_config(parser, cfg, name: str) -> dict:
    import yaml

    sub_parser = parser._subcommands_action._name_parser_map[name]
    text = sub_parser.dump(cfg[name], skip_validation=True, skip_unset=False)  # null (e.g. pretrained) is a value
    resolved = yaml.safe_load(text) or {}
    resolved.pop("config", None)
    return resolved


def _subclass_names(base: type) -> list[str]:
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_"):
            found.append(cls.__name__)
    return sorted(set(found))


def _argument_error_message(err: Exception, command: str | None) -> str:
    """One readable line for a jsonargparse error (which names the key and the value at fault)."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = re.search(r'Parser key "([^"]+)"', text)
    given = re.search(r"Given value: (.*)", text)
    nested = re.search(r"NestedArg\(key='([^']+)', val='([^']*)'\)", text)
    if key and nested:  # an invalid init argument of a class_path object, e.g. --method.ot dykstra
        detail = next((line for line in lines if "Expected" in line or "not" in line), lines[-1])
        message = f"{key.group(1)}.{nested.group(1)}: invalid value {nested.group(2)!r} ({detail})"
    elif key and given:
        message = f"{key.group(1)}: invalid value {given.group(1).strip()!r}"
        root = key.group(1).split(".")[0]
        from fedprompt.data import FederatedData
        from fedprompt.methods import Method

        known = {"method": Method, "data": FederatedData}.get(root)
        if known is not None and key.group(1) == root:
            message += f"; known {root} classes: {', '.join(_subclass_names(known))} (or a full class_path)"
        else:
            message += f" ({lines[1] if len(lines) > 1 else lines[0]})"
    else:
        message = " ".join(lines[:3])
    return message + f". See: fedprompt {command or ''} --help".rstrip()


def _find_cause(err: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``err``'s cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _no_exit_on_error(parser) -> None:
    parser.exit_on_error = False
    if parser._subcommands_action:
        for sub in parser._subcommands_action._name_parser_map.values():
            _no_exit_on_error(sub)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fedprompt`` console script."""
    from jsonargparse import CLI, capture_parser, set_parsing_settings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # args.py's attribute docstrings -> --help
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = with_run_config(argv)
        components = commands()
        import fedprompt.fit

        if not any(arg in ("-h", "--help") for arg in argv):  # a help page needs no method class: skip Lightning
            import fedprompt.methods

            fedprompt.methods.import_all()  # short names (--method FedOTP) resolve among the imported subclasses

        parser = capture_parser(lambda: CLI(components, args=argv))
        _no_exit_on_error(parser)
        try:
            cfg = parser.parse_args(argv)
        except ArgumentError as err:
            command = next((a for a in argv if a in components), None)
            raise FedPromptError(_argument_error_message(err, command)) from None
        name = cfg.subcommand
        try:
            init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
        except Exception as err:  # jsonargparse wraps errors raised in __init__ (e.g. a bad method.mu)
            cause = _find_cause(err, FedPromptError)
            if cause is None:
                raise
            raise cause from None
        fedprompt.fit.RESOLVED_CONFIG = _resolved_config(parser, cfg, name)
        kwargs = {k: v for k, v in vars(init[name]).items() if k != "config"}
        try:
            components[name](**kwargs)
        finally:
            fedprompt.fit.RESOLVED_CONFIG = None
    except FedPromptError as err:
        print(f"fedprompt: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"fedprompt: {err or 'interrupted.'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
