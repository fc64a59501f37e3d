"""MkDocs hook: the parts of the site that are built from the code at build time, so they cannot drift.

A page asks for a generated part with an HTML comment on a line of its own:

- ``<!-- generated: help COMMAND -->`` (indented too: inside an admonition): the output of ``fedprompt COMMAND
  --help`` (``help -`` for ``fedprompt --help``), run in a subprocess on this checkout's code (offline, no model or
  data is loaded);
- ``<!-- generated: errors -->``: every one-line error message fedprompt's code can print (``FedPromptError``), read
  from the source with ``ast``, grouped by area (``error_catalogue.py``);
- ``<!-- generated: warnings -->``: every ``fedprompt: warning:`` line, the same way;
- ``<!-- generated: runnable -->``: the command blocks of the site the test suite runs (``runnable_blocks.py``);
- ``<!-- generated: settings fedprompt.methods.fedotp.FedOTP -->``: a method's own settings (the ``--method.*`` flags),
  their defaults and their docstrings, read from the source with griffe (the local optimiser's settings, which every
  trained method shares, are listed once, on the methods page: ``settings fedprompt.methods.method.OptimizerArgs``).

An unknown directive, or a help command that fails, stops the build.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mkdocs.exceptions import PluginError

sys.path.insert(0, str(Path(__file__).parent))
from griffe_roles import markdown_docstring  # noqa: E402  (the docs' own helpers, beside this file)
from runnable_blocks import listing  # noqa: E402
from error_catalogue import catalogue  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIRECTIVE = re.compile(r"^( *)<!-- generated: (\w+)(?: (\S+))? -->$", re.MULTILINE)
#: help pages are rendered at this width (jsonargparse wraps to $COLUMNS)
HELP_COLUMNS = "100"

_help_cache: dict[str, str] = {}


# ------------------------------------------------------------------------------------------------------ --help pages
def help_text(command: str) -> str:
    """``fedprompt COMMAND --help`` (``-``: ``fedprompt --help``) as this checkout prints it."""
    if command not in _help_cache:
        args = [] if command == "-" else [command]
        env = dict(os.environ, COLUMNS=HELP_COLUMNS,
                   PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        result = subprocess.run([sys.executable, "-m", "fedprompt", *args, "--help"], capture_output=True, text=True,
                                cwd=ROOT, env=env, timeout=120)
        if result.returncode != 0:
            raise PluginError(f"`fedprompt {' '.join(args)} --help` failed ({result.returncode}): "
                              f"{result.stderr.strip()[-500:]}")
        _help_cache[command] = result.stdout.rstrip()
    return _help_cache[command]


def help_block(command: str) -> str:
    """A fenced block with the help text (``$ fedprompt ... --help`` on its first line)."""
    shown = "fedprompt --help" if command == "-" else f"fedprompt {command} --help"
    return f"```text\n$ {shown}\n{help_text(command)}\n```"


# --------------------------------------------------------------------------------------------------- method settings
_package = None


def _yaml_value(value) -> str:
    """A default as the YAML of a config writes it (``null``, ``true``, strings unquoted)."""
    text = str(value)
    try:
        literal = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(literal, str):
        return literal
    return {"None": "null", "True": "true", "False": "false"}.get(text, text)


#: settings every trained method shares, listed once on the methods page
SHARED_SETTINGS = ("fedprompt.methods.method.Method", "fedprompt.methods.method.TrainedMethod",
                   "fedprompt.methods.method.OptimizerArgs")


def settings_table(path: str) -> str:
    """The dataclass fields of class ``path`` and its bases, but for those every trained method shares (unless the
    class gives one another default): flag, default, docstring."""
    import griffe

    global _package
    if _package is None:
        _package = griffe.load("fedprompt", search_paths=[str(ROOT)])
    try:
        cls = _package[path.removeprefix("fedprompt.")]
    except KeyError:
        raise PluginError(f"settings: no class {path} in fedprompt") from None
    members = {}
    for klass in [*reversed(cls.mro()), cls]:
        if klass.path not in SHARED_SETTINGS or klass is cls:
            members.update(klass.members)
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, member in members.items():
        if (name.startswith("_") or not member.is_attribute or member.annotation is None or member.docstring is None
                or "ClassVar" in str(member.annotation) or "property" in member.labels):
            continue
        meaning = " ".join(markdown_docstring(member.docstring.value).split()).replace("|", "\\|")
        default = _yaml_value(member.value).replace("|", "\\|")
        rows.append(f"| `{name}` | `{default}` | {meaning} |")
    if len(rows) == 2:
        raise PluginError(f"settings: {path} declares no documented settings")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------------ hooks
def on_pre_build(config, **kwargs) -> None:
    """Run the help commands in parallel once per build."""
    _help_cache.clear()
    commands = ["-", "fit", "evaluate", "zeroshot", "sweep", "partition", "bench", "table", "audit"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(help_text, commands))


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        indent, what, argument = match.groups()
        if what == "help" and argument:
            text = help_block(argument)
        elif what == "settings" and argument:
            text = settings_table(argument)
        elif what == "runnable" and argument is None:
            text = listing(Path(config["docs_dir"]))
        elif what in ("errors", "warnings") and argument is None:
            text = catalogue(what)
        else:
            raise PluginError(f"{page.file.src_path}: unknown directive {match.group(0).strip()!r}")
        return "\n".join(indent + line if line else line for line in text.split("\n"))  # inside an admonition too

    return DIRECTIVE.sub(replace, markdown)
