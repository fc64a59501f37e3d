"""The command blocks of the docs that the test suite runs (``tests/test_docs.py``), and the list of them on the site.

A fenced block right after a line ``<!-- runnable -->`` (or ``<!-- runnable: offline -->``: it needs ``../shared``)
is runnable. A ``bash`` block holds ``fedprompt ...`` or ``python -m fedprompt ...`` commands, one per line (``\\``
continues a line, ``#`` starts a comment); a ``python`` block is a script. No import of mkdocs or fedprompt here.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^<!-- runnable(?:: (offline))? -->\s*$")
FENCE = re.compile(r"^```(\w*)")


@dataclass(frozen=True)
class Block:
    """One runnable block: its page (relative to docs/), the line of its fence, its language and code."""

    page: str
    line: int
    language: str
    code: str
    offline: bool

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def page_blocks(path: Path, docs: Path) -> list[Block]:
    """The runnable blocks of one page, in order."""
    lines = path.read_text().split("\n")
    found = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise ValueError(f"{path}:{i + 1}: <!-- runnable --> must be followed by a fenced code block")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        found.append(Block(path.relative_to(docs).as_posix(), i + 2, fence.group(1), "\n".join(lines[i + 2:end]),
                           marker.group(1) == "offline"))
    return found


def all_blocks(docs: Path) -> dict[str, list[Block]]:
    """Every page's runnable blocks (pages without any are left out)."""
    pages = {}
    for path in sorted(docs.rglob("*.md")):
        blocks = page_blocks(path, docs)
        if blocks:
            pages[path.relative_to(docs).as_posix()] = blocks
    return pages


def commands(block: Block) -> list[list[str]]:
    """The fedprompt command lines of a bash block, each as its arguments after ``fedprompt``."""
    if block.language != "bash":
        raise ValueError(f"{block.where}: only bash and python blocks are runnable, not {block.language!r}")
    joined = re.sub(r"\\\n\s*", " ", block.code)
    found = []
    for line in joined.split("\n"):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "fedprompt":
            found.append(words[1:])
        elif words[:3] == ["python", "-m", "fedprompt"]:
            found.append(words[3:])
        else:
            raise ValueError(f"{block.where}: a runnable bash block holds fedprompt commands only, not {line!r}")
    return found


def listing(docs: Path) -> str:
    """Markdown: every runnable block of the site, by page (for the contributors' page)."""
    rows = ["| page | line | needs `../shared` | first line |", "|---|---|---|---|"]
    for page, blocks in all_blocks(docs).items():
        for block in blocks:
            first = next((line for line in block.code.split("\n") if line.strip()), "")
            rows.append(f"| [{page}]({page}) | {block.line} | {'yes' if block.offline else 'no'} | `{first}` |")
    return "\n".join(rows)
