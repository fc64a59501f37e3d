"""The documentation site stays true: it builds with --strict, its runnable command blocks run, its figures are dated
or generated, every page is in the nav, the error messages it quotes are real, and README.md stays a front page."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED, require

DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_hooks"))
from error_catalogue import messages  # noqa: E402  (the docs' own helpers: no mkdocs needed)
from runnable_blocks import all_blocks, commands  # noqa: E402

PAGES = all_blocks(DOCS)
DOCS_EXTRA = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


# ------------------------------------------------------------------------------------------------------ the site
def test_site_builds_strict(tmp_path):
    missing = [name for name in DOCS_EXTRA if importlib.util.find_spec(name.split(".")[0]) is None
               or importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)} missing): pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cli = (site / "cli" / "index.html").read_text()
    assert "usage: fedprompt fit" in cli and "--federation.rounds" in cli  # generated --help
    fedotp = (site / "methods-global-local" / "index.html").read_text()
    assert "<code>gamma</code>" in fedotp and "<code>0.8</code>" in fedotp  # generated settings table
    errors = (site / "troubleshooting" / "index.html").read_text()
    assert "already holds a run" in errors  # the generated error catalogue
    assert "fedprompt.commands.fit" in (site / "api" / "index.html").read_text()  # mkdocstrings


def nav_pages(nav) -> list[str]:
    """The Markdown files named in mkdocs.yml's nav."""
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
                   if not p.relative_to(DOCS).as_posix().startswith(("_hooks/", "figures/")))
    assert sorted(set(listed)) == pages
    assert len(listed) == len(set(listed))


# ----------------------------------------------------------------------------------------------- runnable blocks
@pytest.mark.parametrize("page", sorted(PAGES))
def test_runnable_blocks(page, cli, tmp_path, monkeypatch):
    """Every block marked runnable on the page, in order, in one scratch project folder (configs/ and tests/data/ of
    this checkout; ../shared beside it where it exists); each must succeed."""
    blocks = PAGES[page]
    if any(block.offline for block in blocks):
        require(SHARED / "models" / "effl0-minilm")
        require(SHARED / "data" / "pacs-mini")
    project = tmp_path / "project"
    project.mkdir()
    (project / "configs").symlink_to(ROOT / "configs")
    (project / "tests").mkdir()
    (project / "tests" / "data").symlink_to(ROOT / "tests" / "data")  # small inputs (FOCoOp's test word lists)
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(project)
    for block in blocks:
        if block.language == "python":
            exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})
            continue
        for args in commands(block):
            code, out, err = cli(*args)
            assert code == 0, f"{block.where}: fedprompt {' '.join(args)} -> {code}\n{out[-2000:]}\n{err[-2000:]}"


def test_runnable_blocks_are_found():
    """The marker is read: the getting-started page's first run is among them."""
    first = PAGES["getting-started.md"][0]
    assert commands(first) == [["fit", "--config", "configs/smoke.yaml", "--out_dir", "runs/smoke"]]
    assert any(block.offline for blocks in PAGES.values() for block in blocks)


# ------------------------------------------------------------------------------------------------------ figures
#: a number that was measured: a decimal, a power of ten, or a count with a unit of time, size or share
MEASURED = re.compile(r"\d\.\d|\de-\d|\b\d[\d,]*\s?(ms|s|min|GB|MB|KB|%)(?![\w-])")
#: the tag a measured figure's section carries
TAG = re.compile(r"\*measured (\d{4}-\d{2}-\d{2}|on an unrecorded date)\b[^*]*? on [^*]+\*", re.IGNORECASE)
INCLUDE = re.compile(r'^--8<-- "docs/figures/[\w.-]+"$', re.MULTILINE)
NOT_MEASURED = "<!-- not measured:"


def sections(text: str) -> list[str]:
    """A page cut at its headings (lines starting with #, outside fenced blocks)."""
    parts, current, fenced = [], [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        if line.startswith("#") and not fenced and current:
            parts.append("\n".join(current))
            current = []
        current.append(line)
    parts.append("\n".join(current))
    return parts


def figures(section: str) -> list[str]:
    """The tables and output blocks of a section that hold measured-looking numbers (first line of each)."""
    found, lines, i = [], section.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            body = "\n".join(lines[i + 1:end])
            if line.strip("`").strip() in ("", "text") and MEASURED.search(body):
                found.append(lines[i + 1] if i + 1 < len(lines) else line)
            i = end + 1
            continue
        if line.startswith("|"):
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            marked = i > 0 and lines[i - 1].startswith(NOT_MEASURED)
            if not marked and any(MEASURED.search(row) for row in lines[i + 2:end]):
                found.append(line)
            i = end
            continue
        i += 1
    return found


def test_figures_are_dated_or_generated():
    """Every table or output block with measured-looking numbers sits in a section that says when and on which
    machine it was measured, or that includes a file a benchmark wrote."""
    undated = []
    for path in sorted(DOCS.rglob("*.md")):
        if path.relative_to(DOCS).parts[0] in ("figures", "_hooks"):  # files benchmarks write, the build's code
            continue
        for section in sections(path.read_text()):
            flat = " ".join(section.split())
            if TAG.search(flat) or INCLUDE.search(section):
                continue
            undated += [f"{path.relative_to(ROOT)}: {first[:90]}" for first in figures(section)]
    assert not undated, "figures without '*Measured DATE ... on MACHINE*' in their section:\n" + "\n".join(undated)


def test_figure_check_has_teeth():
    table = "## Speed\n\n| run | seconds |\n|---|---|\n| fit | 1.5 s |\n"
    assert figures(sections(table)[0]) == ["| run | seconds |"]
    assert TAG.search("*Measured 2026-12-02 (commit abc1234) on the 2-core dev machine.*")
    assert not TAG.search("*Measured recently on a laptop.*")
    settings = "## Settings\n\n<!-- not measured: defaults -->\n| key | default |\n|---|---|\n| lr | 0.002 |\n"
    assert figures(sections(settings)[0]) == []


# ------------------------------------------------------------------------------------------- quoted messages
def test_the_errors_the_docs_quote_are_real():
    """Each 'fedprompt: error:' line quoted on the troubleshooting page holds a message the code can print (a message
    may be composed: the command line's explainer adds the flag before it and a hint after it)."""
    patterns = [re.compile(pattern) for *_, pattern in messages("errors")]

    def real(line: str) -> bool:
        return any(pattern.search(line) for pattern in patterns)

    quoted = re.findall(r"^fedprompt: error: (.+)$", (DOCS / "troubleshooting.md").read_text(), re.MULTILINE)
    assert len(quoted) >= 8
    assert not [line for line in quoted if not real(line)]
    out_dir = next(line for line in quoted if line.startswith("out_dir r1 already holds a run"))
    assert not real(out_dir.replace("already holds a run", "already has a run"))  # a changed word is caught


def test_the_catalogue_finds_raised_returned_and_listed_messages():
    texts = [text for _, _, text, _ in messages("errors")]
    assert len(texts) > 300
    assert "--config {name}: no such file." in texts  # raised
    assert any(t.startswith("out_dir {folder} already holds a run") for t in texts)  # returned by a problem helper
    assert any("has no setting" in t for t in texts)  # returned by the CLI's explainer
    assert any(t.startswith("dp.delta {delta} is not below") for t in (w for _, _, w, _ in messages("warnings")))


# ----------------------------------------------------------------------------------------------- the front page
def test_readme_is_a_front_page_whose_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split("\n")) <= 200
    setup = readme.split("## Set up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip().split("\n")
    assert setup == ["pip install -e . && fedprompt fit --config configs/promptfl_cifar10.yaml "
                     "--data.root data/cifar-10 --data.download true",
                     'pip install -e ".[dev]" && python -m pytest -q']
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python3 -m pip install -e ".[dev]" && python3 -m pytest -q' in ci


def test_readme_lists_every_method_with_a_page():
    from fedprompt.methods import METHODS

    readme = (ROOT / "README.md").read_text()
    table = [line for line in readme.split("\n") if line.startswith("| ") and "](docs/" in line]
    for name in METHODS:
        assert any(f"`{name}`" in line for line in table), name
    for page in re.findall(r"\]\((docs/[\w./-]+?\.md)(?:#[\w-]+)?\)", readme):
        assert (ROOT / page).is_file(), page


def test_changelog_has_the_current_version_and_an_unreleased_section():
    import fedprompt

    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog
    assert re.search(rf"^## {re.escape(fedprompt.__version__)}\b", changelog, re.MULTILINE)
