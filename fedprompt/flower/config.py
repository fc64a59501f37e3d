"""A fedprompt config file as the deployed Flower app reads it: the run settings of ``config`` and ``args`` (the
app's run config) and a node's own ``args`` and ``data-root``, parsed as ``fedprompt fit`` parses them (the same
settings, the same one-line errors of :mod:`fedprompt.cli_errors`), without the command line itself: the Flower app
is an entry point of its own."""

from __future__ import annotations

import shlex
from argparse import ArgumentError
from dataclasses import fields

from fedprompt.errors import FedPromptError


def run_args(config: str, args: str = "", node_args: str = "", data_root: str | None = None):
    """The :class:`fedprompt.run.RunArgs` of a fedprompt config file with command-line flags (``args``: the app's,
    ``node_args``: this node's own, applied last; ``data_root``: ``--data.root``); one :class:`FedPromptError` line
    for a bad file, key or value."""
    import yaml
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    import fedprompt.data
    import fedprompt.methods
    from fedprompt.cli_errors import check_config_files, check_inline_values, explain_argument_error
    from fedprompt.methods.method import Method
    from fedprompt.run import RunArgs

    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_enabled=[Method])
    fedprompt.methods.import_all()
    fedprompt.data.import_readers()
    flags = ["--config", str(config), *shlex.split(args or ""), *shlex.split(node_args or "")]
    flags += ["--data.root", str(data_root)] if data_root else []
    parser = ArgumentParser(prog="fedprompt fit", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(RunArgs, nested_key=None, skip={"resolved_config"}, sub_configs=True)
    check_config_files(flags)
    check_inline_values(flags)
    try:
        cfg = parser.parse_args(flags)
        init = parser.instantiate(cfg)
    except Exception as err:  # jsonargparse wraps errors raised in a settings class's __init__
        cause = _cause(err)
        if cause is not None:
            raise cause from None
        if isinstance(err, ArgumentError):
            raise FedPromptError(explain_argument_error(err, ["fit", *flags], {"fit": parser})) from None
        raise
    resolved = yaml.safe_load(parser.dump(cfg, skip_validation=True, skip_unset=False)) or {}
    resolved.pop("config", None)
    return RunArgs(**{f.name: init[f.name] for f in fields(RunArgs) if f.name != "resolved_config"},
                   resolved_config=resolved)


def _cause(err: BaseException | None) -> FedPromptError | None:
    """The first :class:`FedPromptError` in ``err``'s cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, FedPromptError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def num_clients(config: str, args: str = "") -> int:
    """The number of clients a config makes (its data split, without loading a model; one for
    ``federation.central``)."""
    run = run_args(config, args)
    return 1 if run.federation.central else len(run.data.setup().clients)
