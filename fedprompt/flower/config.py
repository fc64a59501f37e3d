"""A fedprompt config file as the deployed Flower app reads it: the run settings of ``config`` and ``args`` (the
app's run config) and a node's own ``args`` and ``data-root``, parsed exactly as ``fedprompt fit`` parses them."""

from __future__ import annotations

import shlex
from dataclasses import fields


def run_args(config: str, args: str = "", node_args: str = "", data_root: str | None = None):
    """The :class:`fedprompt.run.RunArgs` of a fedprompt config file with command-line flags (``args``: the app's,
    ``node_args``: this node's own, applied last; ``data_root``: ``--data.root``), parsed exactly as ``fedprompt fit``
    parses them (one :class:`FedPromptError` line for a bad file, key or value)."""
    from jsonargparse import set_parsing_settings

    import fedprompt.data
    import fedprompt.methods
    from fedprompt.__main__ import instantiate, parse
    from fedprompt.methods.method import Method
    from fedprompt.run import RunArgs

    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_enabled=[Method])
    fedprompt.methods.import_all()
    fedprompt.data.import_readers()
    argv = ["fit", "--config", str(config), *shlex.split(args or ""), *shlex.split(node_args or "")]
    if data_root:
        argv += ["--data.root", str(data_root)]
    _, parser, cfg = parse(argv)
    init, resolved = instantiate(parser, cfg)
    return RunArgs(**{f.name: init[f.name] for f in fields(RunArgs) if f.name != "resolved_config"},
                   resolved_config=resolved)


def num_clients(config: str, args: str = "") -> int:
    """The number of clients a config makes (its data split, without loading a model; one for
    ``federation.central``)."""
    run = run_args(config, args)
    return 1 if run.federation.central else len(run.data.setup().clients)
