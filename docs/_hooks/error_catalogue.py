"""The messages fedprompt's code can print, read from the source with ``ast`` (no import of fedprompt or mkdocs):
the error catalogue of the troubleshooting page, and the check that the messages the docs quote are real."""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ message catalogue
def _parts(node: ast.AST) -> list | None:
    """A message expression as its parts: literal strings, and ``ast`` nodes for the computed parts; ``None`` when
    nothing of it is literal (a message built elsewhere, listed where it is built)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values]  # a Constant's string, or a FormattedValue's expression
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _parts(node.left), _parts(node.right)
        if left is None and right is None:
            return None
        return (left if left is not None else [node.left]) + (right if right is not None else [node.right])
    return None


def _placeholder(node: ast.AST) -> str:
    """A computed part as the catalogue shows it: ``{expression}``, a joined list as the list (``{names}``)."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and isinstance(node.func.value, ast.Constant) and len(node.args) == 1):
        node = node.args[0]
    return "{" + ast.unparse(node) + "}"


def _text(parts: list) -> str:
    """The message as the catalogue shows it: each computed part as ``{expression}``."""
    return " ".join("".join(p if isinstance(p, str) else _placeholder(p) for p in parts).split())


def _literal_pattern(text: str) -> str:
    """A literal part as a regular expression; any run of white space matches any other (messages are wrapped)."""
    if not text.strip():
        return r"\s*"
    words = r"\s+".join(map(re.escape, text.split()))
    return (r"\s+" if text[:1].isspace() else "") + words + (r"\s+" if text[-1:].isspace() else "")


def _pattern(parts: list) -> str:
    """A regular expression that matches every message the parts can print (computed parts: anything)."""
    return "".join(_literal_pattern(p) if isinstance(p, str) else ".*?" for p in parts)


def _callee(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _is_problem_list(node: ast.Call) -> bool:
    """``problems.append(...)``: one part of a message that lists several problems."""
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "append" and isinstance(func.value, ast.Name)
            and "problem" in func.value.id)


#: functions whose returned strings are (parts of) error messages
MESSAGE_FUNCTIONS = re.compile(r"problem|hint|message|explain|check_setting|not_writable|acquire|reason")


def _message_nodes(function: ast.FunctionDef, kind: str):
    """The message expressions of one function: what it raises (or warns), lists as a problem, or returns as one."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and node.args:
            name = _callee(node)
            if kind == "errors" and name == "ClientFailure":
                yield node.args[-1]
            elif (kind == "errors" and (name == "FedPromptError" or _is_problem_list(node))) or \
                    (kind == "warnings" and name == "warn"):
                yield node.args[0]
        elif kind == "errors" and isinstance(node, ast.Return) and node.value is not None \
                and MESSAGE_FUNCTIONS.search(function.name):
            yield node.value


@lru_cache(maxsize=None)
def messages(kind: str) -> tuple[tuple[str, str, str, str], ...]:
    """(module, function, message, pattern) of every error (``kind="errors"``) or warning (``"warnings"``)."""
    unique = {}
    for path in sorted((ROOT / "fedprompt").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in _message_nodes(function, kind):
                parts = _parts(node)
                if parts is None:
                    continue
                literal = "".join(p for p in parts if isinstance(p, str))
                if len(literal.strip()) > 12:  # more than a bare placeholder or a joiner
                    text = _text(parts)  # nested functions are walked twice: the innermost name is kept
                    unique[(module, text)] = (module, function.name, text, _pattern(parts))
    return tuple(sorted(unique.values()))


#: module prefix -> the area a message belongs to (first match wins)
AREAS = [
    ("fedprompt.__main__", "The command line"), ("fedprompt.cli_errors", "The command line"),
    ("fedprompt.args", "Settings"), ("fedprompt.run", "Settings"), ("fedprompt.methods", "Method settings"),
    ("fedprompt.data", "Data"), ("fedprompt.backbone", "Backbone and weights"),
    ("fedprompt.prompts", "Method settings"),
    ("fedprompt.federation.checkpoint", "Resume and checkpoints"), ("fedprompt.federation.privacy", "Privacy"),
    ("fedprompt.federation", "Training"), ("fedprompt.fit", "The run folder"), ("fedprompt.rundir", "The run folder"),
    ("fedprompt.loggers", "Logging"), ("fedprompt.flower", "Flower"), ("fedprompt.sweep", "Sweeps and tables"),
    ("fedprompt.table", "Sweeps and tables"), ("fedprompt.partition_table", "Sweeps and tables"),
    ("fedprompt.bench", "Benchmarks"), ("fedprompt.ot", "Method settings"), ("fedprompt", "Other"),
]


def _code(text: str) -> str:
    """``text`` as a Markdown code span (safe for backticks inside)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def catalogue(kind: str) -> str:
    """The Markdown list of every message of ``kind``, one section per area, each message with where it comes from."""
    areas: dict[str, list[str]] = {}
    for module, function, text, _ in messages(kind):
        area = next(title for prefix, title in AREAS if module == prefix or module.startswith(prefix + "."))
        areas.setdefault(area, []).append(f"- {_code(text)} <small>`{module}.{function}`</small>")
    order = list(dict.fromkeys(title for _, title in AREAS))
    parts = []
    for area in sorted(areas, key=order.index):
        parts.append(f"### {area}\n\n" + "\n".join(areas[area]))
    return "\n\n".join(parts)


