"""The ``fedprompt`` command line: ``fit``, ``evaluate``, ``zeroshot``, ``sweep``, ``partition``, ``bench``, ``table``.

Every command takes ``--config FILE.yaml`` (flat YAML; ``class_path`` selects method and data), flags that override
it (``--data.root``, ``--federation.rounds``, ...) and ``--print_config``. ``fit`` and ``evaluate`` with ``--resume
DIR/checkpoints/last.ckpt`` and no ``--config`` read the run's own ``DIR/hyperparameters.yaml``.

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
from dataclasses import fields
from pathlib import Path

from fedprompt.errors import FedPromptError

#: subcommands whose --resume names a run directory whose hyperparameters.yaml is the default config
RESUMING = ("fit", "evaluate")


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
    if name != "partition" and takes_run(options):
        description += f" Methods (--method NAME or a class_path): {', '.join(METHODS)}."
    parser = ArgumentParser(prog=f"fedprompt {name}", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A run config (YAML); flags override it.")
    if takes_run(options):
        parser.add_class_arguments(RunArgs, nested_key=None, skip={"resolved_config"}, sub_configs=True)
    if options is not None:
        positional = dict(getattr(options, "positional", {}))
        for key, text in positional.items():
            parser.add_argument(key, type=str, nargs="+", help=text)
        parser.add_class_arguments(options, nested_key=None,
                                   skip=set(positional) | set(getattr(options, "not_flags", ())))
    return parser


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
    run = RunArgs(**{f.name: init[f.name] for f in fields(RunArgs) if f.name != "resolved_config"},
                  resolved_config=resolved)
    if options is None:
        return function(run)
    return function(run, options(**values))


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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fedprompt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:  # before anything else is imported: it must stay instant
        print(f"fedprompt {version()}")
        return
    from jsonargparse import set_parsing_settings

    from fedprompt.methods.method import Method

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # bench's profiler: no start/stop chatter (read when torch loads)
    # the settings' attribute docstrings -> --help; methods are dataclasses selected by class_path
    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_enabled=[Method])
    try:
        argv = with_run_config(argv)
        from fedprompt.commands import COMMANDS

        needs_classes = not argv or argv[0] not in COMMANDS or takes_run(COMMANDS[argv[0]][1])
        if needs_classes and not any(arg in ("-h", "--help") for arg in argv):  # a help page needs no class
            import fedprompt.data
            import fedprompt.methods

            fedprompt.methods.import_all()  # short names (--method FedOTP, --data Caltech101) resolve among the
            fedprompt.data.import_readers()  # imported subclasses
        name, parser, cfg = parse(argv)
        init, resolved = instantiate(parser, cfg)
        run_command(name, init, resolved, argv[1:])
    except FedPromptError as err:
        print(f"fedprompt: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"fedprompt: {err or 'interrupted.'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
