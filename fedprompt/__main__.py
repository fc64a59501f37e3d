"""The ``fedprompt`` command line: ``fit``, ``evaluate``, ``zeroshot``, ``sweep``, ``partition``, ``bench``, ``table``,
``audit``.

Every command takes ``--config FILE.yaml`` (flat YAML; ``class_path`` selects method and data), flags that override
it (``--data.root``, ``--federation.rounds``, ...) and ``--print_config``. ``fit`` and ``evaluate`` with ``--resume
DIR/checkpoints/last.ckpt`` and no ``--config`` read the run's own ``DIR/hyperparameters.yaml``, as ``audit RUN_DIR``
does.

The parser is built with jsonargparse's public API: one sub-parser per command, each with the run settings
(:class:`fedprompt.run.RunArgs`, flat) and the command's own options (:data:`fedprompt.commands.COMMANDS`); the
parsed values are instantiated and handed to the command as typed objects: ``fit(run)``, ``bench(run, options)``. An
options class may declare ``takes_run = False`` (the command gets its options alone: ``table(options)``) and
``positional`` fields (given as positional arguments: ``fedprompt table RUN_DIR ...``).

Importing this module is cheap (no torch, Lightning or open_clip): the commands' modules are imported when the
parser is built, and the model and data only when a command runs.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Optional, Union

from fedprompt.errors import FedPromptError, one_line

#: subcommands whose --resume names a run directory whose hyperparameters.yaml is the default config
RESUMING = ("fit", "evaluate")
#: subcommands that read no method: a config's method settings are checked (from the methods' source) but the
#: method module, and with it torch and Lightning, is never imported
NO_METHOD = ("partition",)


def version() -> str:
    """The installed fedprompt's version (its package metadata; the source tree's ``fedprompt.__version__`` where
    fedprompt runs without being installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("fedprompt")
    except PackageNotFoundError:
        import fedprompt

        return fedprompt.__version__


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

    if argv and argv[0] == "audit":
        return with_audited_run(argv)
    if not argv or argv[0] not in RESUMING:
        return argv
    rest = argv[1:]
    resume = _flag_value(rest, "--resume")
    if not resume or resume == "null" or _flag_value(rest, "--config") is not None:
        return argv
    if not Path(resume).is_file():
        raise FedPromptError(f"--resume {resume}: checkpoint file not found; pass the checkpoints/last.ckpt of a run "
                             "directory.")
    run = run_dir_of(resume)
    config = run / "hyperparameters.yaml" if run is not None else None
    if config is None or not config.is_file():
        raise FedPromptError(f"--resume {resume}: no --config given and no hyperparameters.yaml in the run directory "
                             f"of the checkpoint ({config or Path(resume).parent / '..'}); pass the run's config "
                             "with --config.")
    return [argv[0], "--config", str(config), "--out_dir", str(run), *rest]


def first_positional(args: list[str]) -> str | None:
    """The first argument of ``args`` that is neither a flag nor a flag's value."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg.startswith("--") and "=" not in arg and arg not in ("--help", "--print_config")
        else:
            return arg
    return None


def with_audited_run(argv: list[str]) -> list[str]:
    """``audit RUN_DIR`` without ``--config``: put ``--config RUN_DIR/hyperparameters.yaml`` right after the
    subcommand, so the run's own settings are the defaults that flags override."""
    rest = argv[1:]
    run = first_positional(rest)
    if run is None or _flag_value(rest, "--config") is not None or any(a in ("-h", "--help") for a in rest):
        return argv
    config = Path(run) / "hyperparameters.yaml"
    if not config.is_file():
        raise FedPromptError(f"audit {run}: no hyperparameters.yaml there; pass the run directory of a fedprompt fit "
                             "run (or its settings with --config).")
    return [argv[0], "--config", str(config), *rest]


def first_sentence(text: str | None) -> str:
    """The first sentence of a docstring (a command's one-line summary in ``fedprompt --help``)."""
    words = " ".join((text or "").split("\n\n")[0].split())
    end = words.find(". ")
    return words if end < 0 else words[: end + 1]


def takes_run(options) -> bool:
    """Whether a command takes the run settings (every command but those whose options say otherwise)."""
    return getattr(options, "takes_run", True)


def command_parser(name: str):
    """The parser of one command: ``--config``, the run settings (:class:`fedprompt.run.RunArgs`, flat) and the
    command's own options (its ``positional`` fields as positional arguments)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from fedprompt.run import RunArgs
    from fedprompt.commands import COMMANDS
    from fedprompt.methods import METHODS

    function, options = COMMANDS[name]
    description = " ".join((function.__doc__ or "").split("\n\n")[0].split())
    if name not in NO_METHOD and takes_run(options):
        description += f" Methods (--method NAME or a class_path): {', '.join(METHODS)}."
    parser = ArgumentParser(prog=f"fedprompt {name}", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A run config (YAML); flags override it.")
    if takes_run(options):
        skip = {"resolved_config"} | ({"method"} if name in NO_METHOD else set())
        parser.add_class_arguments(RunArgs, nested_key=None, skip=skip, sub_configs=True)
        if name in NO_METHOD:  # the method is checked from its source (cli_errors.check_arguments), never built
            parser.add_argument("--method", type=Optional[Union[str, dict]],
                                help=f"Not used by {name} (a run config's method is accepted and left unused).")
        else:
            name_the_methods(parser)
    if options is not None:
        positional = dict(getattr(options, "positional", {}))
        for key, text in positional.items():
            parser.add_argument(key, type=str, nargs="+", help=text)
        parser.add_class_arguments(options, nested_key=None,
                                   skip=set(positional) | set(getattr(options, "not_flags", ())))
    return parser


def name_the_methods(parser) -> None:
    """``--method``'s help lists fedprompt's methods by name (jsonargparse would list only the imported subclasses of
    :class:`~fedprompt.methods.method.Method`, and a help page imports none)."""
    from fedprompt.methods import METHODS

    for action in parser._actions:  # argparse's list of a parser's arguments
        if action.dest == "method" and hasattr(action, "extra_help"):
            action.extra_help = lambda: f", one of: {', '.join(METHODS)}, or the class_path of your own Method " \
                                        "subclass; --method.help NAME shows a method's settings"


def top_parser():
    """``fedprompt``: the list of commands with their one-line summaries (each command's own parser is built only
    when it runs: :func:`command_parser`)."""
    from jsonargparse import ArgumentParser

    from fedprompt.commands import COMMANDS

    parser = ArgumentParser(prog="fedprompt", exit_on_error=False,
                            description="Federated prompt learning on frozen CLIP (open_clip, Lightning Fabric). "
                                        "Run 'fedprompt COMMAND --help' for a command's settings.")
    parser.add_argument("--version", action="version", version=f"fedprompt {version()}",
                        help="Print the installed version and exit.")
    subcommands = parser.add_subcommands(required=True, dest="subcommand")
    for name, (function, _) in COMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(prog=f"fedprompt {name}"), help=first_sentence(function.__doc__))
    return parser


def _find_cause(err: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``err``'s cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_command(name: str, init, resolved: dict, argv: list[str] | None = None):
    """Call command ``name`` with the instantiated values ``init`` of its parser: the run settings as one
    :class:`fedprompt.run.RunArgs` (with the resolved config), and its options (an options class with a
    ``command_line`` field gets the command's arguments ``argv`` there)."""
    from fedprompt.run import RunArgs
    from fedprompt.commands import COMMANDS

    function, options = COMMANDS[name]
    if options is not None:
        skipped = set(getattr(options, "not_flags", ()))
        values = {f.name: init[f.name] for f in fields(options) if f.name not in skipped}
        if "command_line" in skipped:
            values["command_line"] = list(argv or [])
    if not takes_run(options):
        return function(options(**values))
    run_values = {f.name: init[f.name] for f in fields(RunArgs) if f.name != "resolved_config"}
    if name in NO_METHOD:
        run_values["method"] = None  # checked from its source, never built (see command_parser)
    run = RunArgs(**run_values, resolved_config=resolved)
    if options is None:
        return function(run)
    return function(run, options(**values))


@contextmanager
def _program_name(prog: str):
    """``sys.argv[0]`` is ``prog`` inside the block: jsonargparse's ``--KEY.help CLASS`` page builds a parser of its
    own, whose usage line names the program from it (``usage: fedprompt fit ...``, not ``usage: fedprompt``)."""
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = prog
    try:
        yield
    finally:
        if saved is not None:
            sys.argv[0] = saved


def parse(argv: list[str]):
    """Parse ``fedprompt COMMAND ARGS``: ``(command, its parser, the parsed config)``; a bad argument is one
    :class:`FedPromptError` line naming it."""
    from fedprompt.cli_errors import check_config_files, check_inline_values, explain_argument_error
    from fedprompt.commands import COMMANDS

    if not argv or argv[0] not in COMMANDS:
        top = top_parser()
        if not argv or argv[0] in ("-h", "--help"):
            top.parse_args(argv or ["--help"])  # prints the command list and exits
        known = ", ".join(COMMANDS)
        raise FedPromptError(f"unknown command {argv[0]!r}; choose one of {known} (fedprompt --help).")
    name = argv[0]
    parser = command_parser(name)
    check_config_files(argv[1:])
    check_inline_values(argv[1:])
    try:
        with _program_name(f"fedprompt {name}"):  # the usage line of a --KEY.help page
            return name, parser, parser.parse_args(argv[1:])
    except ArgumentError as err:
        cause = _find_cause(err, FedPromptError)
        if cause is not None:
            raise cause from None
        raise FedPromptError(explain_argument_error(err, argv, {name: parser})) from None


def instantiate(parser, cfg) -> tuple[dict, dict]:
    """The objects of a parsed command line (``parser.instantiate``; a :class:`FedPromptError` raised in a settings
    class's ``__init__`` comes out as itself, not wrapped by jsonargparse) and the resolved config as plain YAML
    data (what hyperparameters.yaml holds, without ``config``)."""
    import yaml

    try:
        init = parser.instantiate(cfg)
    except Exception as err:  # jsonargparse wraps errors raised in __init__ (e.g. a bad method.mu)
        cause = _find_cause(err, FedPromptError)
        if cause is None:
            raise
        raise cause from None
    resolved = yaml.safe_load(parser.dump(cfg, skip_validation=True, skip_unset=False)) or {}
    resolved.pop("config", None)
    return init, resolved


def _help_requested(argv: list[str]) -> bool:
    return any(arg in ("-h", "--help") or arg.partition("=")[0].endswith(".help") for arg in argv)


def method_help(name: str, argv: list[str]) -> bool:
    """``fedprompt NAME --method.help METHOD``: print the settings of one of fedprompt's methods from its source
    (no import: well under a second) and return ``True``; ``False`` for anything else (jsonargparse's own help then
    imports the class: a user's method)."""
    from fedprompt.methods import METHODS
    from fedprompt.methods.catalog import method_help as help_text, method_spec

    value = _flag_value(argv, "--method.help")
    if value is None or value.startswith("-"):  # no method named: the list of them
        print(f"usage: fedprompt {name} --method.help NAME\n\nNAME: {', '.join(METHODS)}, or the class_path of your "
              "own Method subclass.")
        return True
    spec = method_spec(value)
    if spec is None and "." not in value:
        raise FedPromptError(f"--method.help {value}: unknown method; choose one of {', '.join(METHODS)} (or the "
                             "class_path of your own Method subclass).")
    if spec is None:
        return False
    print(help_text(spec, f"fedprompt {name}"), end="")
    return True


def prepare(argv: list[str]) -> None:
    """Before the parser: check the arguments without torch (files, YAML, keys, types, the method's settings from
    its source: :func:`fedprompt.cli_errors.check_arguments`), then import what parsing needs: the data readers
    (light) and only the method module the arguments choose (torch and Lightning load here, once the arguments are
    known to be good)."""
    from fedprompt.cli_errors import check_arguments, check_inline_values
    from fedprompt.commands import COMMANDS

    if not argv or argv[0] not in COMMANDS or not takes_run(COMMANDS[argv[0]][1]):
        return
    import fedprompt.data

    fedprompt.data.import_readers()  # short names (--data Caltech101) resolve among the imported subclasses
    if _help_requested(argv):
        return
    check_inline_values(argv[1:])
    chosen = check_arguments(argv[0], argv[1:])
    if argv[0] not in NO_METHOD and isinstance(chosen.get("method"), str):
        import_method(chosen["method"])


def import_method(value: str) -> None:
    """Import the module of the chosen method (a short name or class_path of fedprompt's, or a user's class_path),
    so that jsonargparse finds it by its short name."""
    from fedprompt.methods.catalog import method_spec

    spec = method_spec(value)
    if spec is not None:
        import fedprompt.methods

        getattr(fedprompt.methods, spec.name)


def without_method_flags(argv: list[str]) -> list[str]:
    """A command that reads no method (:data:`NO_METHOD`): its ``--method.KEY VALUE`` flags, already checked, are
    left out (the parser takes a config's method as plain data)."""
    if not argv or argv[0] not in NO_METHOD:
        return argv
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--method.") and not arg.partition("=")[0].endswith(".help"):
            skip = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(arg)
    return out


def parsing_settings() -> None:
    """jsonargparse's settings for fedprompt's parsers: the settings' attribute docstrings are their ``--help``;
    methods are dataclasses selected by class_path."""
    from jsonargparse import set_parsing_settings

    from fedprompt.methods.method import Method

    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_enabled=[Method])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fedprompt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:  # before anything else is imported: it must stay instant
        print(f"fedprompt {version()}")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # bench's profiler: no start/stop chatter (read when torch loads)
    parsing_settings()
    try:
        argv = with_run_config(argv)
        asks_method_help = any(arg.partition("=")[0] == "--method.help" for arg in argv[1:])
        if asks_method_help and not argv[0].startswith("-") and method_help(argv[0], argv):
            return
        prepare(argv)
        name, parser, cfg = parse(without_method_flags(argv))
        init, resolved = instantiate(parser, cfg)
        run_command(name, init, resolved, argv[1:])
    except FedPromptError as err:
        print(f"fedprompt: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"fedprompt: {err or 'interrupted.'}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of the output went away (fedprompt fit --help | head): not an error here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        sys.exit(1)


if __name__ == "__main__":
    main()
