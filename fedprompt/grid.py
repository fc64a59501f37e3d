"""The runs behind a paper table, on one machine or a cluster: ``fedprompt sweep``'s grid and its launchers.

A sweep is a grid of cells (a fit config each: ``--config``, or every combination of ``--configs``, ``--methods`` and
``--datasets``) times ``--seeds``. A cell is a sweep folder (``sweep.yaml``, ``seed<N>/`` runs, ``seeds.json``,
``seeds.md``): ``OUT`` itself for a single config, ``OUT/<cell>`` in a grid (``OUT/grid.yaml`` lists the cells, so
``fedprompt table OUT`` reads them all). Each (cell, seed) is one ordinary ``fedprompt fit`` run, started by a
launcher:

- ``local``: child processes of the sweep, ``--processes`` at a time (the k-th sees GPU k when there are that many;
  with one process its output streams to the terminal, with several it goes to ``<cell>/seed<N>.log``);
- ``slurm``: one SLURM job per run through submitit (``pip install 'fedprompt[slurm]'``; ``--slurm`` holds the
  executor's parameters; its logs go to ``OUT/submitit/``); ``submitit-local`` runs the same jobs on this machine.

Calling the same command again continues: finished runs are kept, an interrupted run resumes from its checkpoint, a
failed run is run again. A run is claimed while it runs (``<cell>/.seed<N>.lock``, a :class:`~fedprompt.rundir.RunLock`
that the operating system releases when its holder ends), so two sweeps over one folder never run the same seed at
once: the second reports it as running elsewhere. At the end every cell whose seeds all finished gets its seed table,
a grid its paper table (``OUT/table.md``, ``.csv``; :mod:`fedprompt.table`), and every failed run is named with its
exit status and log in one message.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedprompt.errors import FedPromptError
from fedprompt.run import RunArgs, SweepArgs

GRID_FILE = "grid.yaml"
#: sweep options (and run settings) that are not a cell's settings: left out of the flags a grid applies to its cells
SWEEP_FLAGS = ("--config", "--configs", "--methods", "--datasets", "--seeds", "--same_data", "--launcher",
               "--processes", "--slurm", "--wait", "--out_dir", "--overwrite", "--resume", "--print_config")


@dataclass
class Cell:
    """One fit config of the grid: its name (``""`` for a single-config sweep), its sweep folder and resolved
    config (``sweep.yaml``)."""

    name: str
    folder: Path
    config: dict


@dataclass(frozen=True)
class Run:
    """One (cell, seed): a ``fedprompt fit`` run in ``<cell folder>/seed<N>``."""

    cell: str
    folder: Path
    seed: int

    @property
    def label(self) -> str:
        return f"{self.cell}/seed {self.seed}" if self.cell else f"seed {self.seed}"


def is_grid(options: SweepArgs) -> bool:
    """Whether the sweep has grid axes (``--configs``, ``--methods``, ``--datasets``)."""
    return any((options.configs, options.methods, options.datasets))


def sweep_config(config: dict) -> dict:
    """A resolved run config as a sweep saves it: without the sweep's own options, folder and resume."""
    config = {k: v for k, v in config.items() if k not in ("seeds", "same_data")}
    for key in ("configs", "methods", "datasets", "launcher", "processes", "slurm", "wait", "command_line"):
        config.pop(key, None)
    return {**config, "out_dir": None, "resume": None, "overwrite": False}


def run_flags(command_line: list[str] | None) -> list[str]:
    """The run-setting flags of a sweep's command line (everything but :data:`SWEEP_FLAGS` and their values)."""
    args, out, i = list(command_line or []), [], 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in SWEEP_FLAGS:
            i += 1 if "=" in args[i] else 2
            continue
        out.append(args[i])
        i += 1
    return out


def _cell_name(config: str | None, method: str | None, dataset: str | None) -> str:
    parts = [Path(config).stem if config else None, method.rsplit(".", 1)[-1].lower() if method else None,
             Path(dataset).stem if dataset else None]
    return "-".join(p for p in parts if p)


def _read_config(path: str, what: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise FedPromptError(f"sweep: {what} {path} cannot be read ({' '.join(str(err).split())}).") from None
    if not isinstance(data, dict):
        raise FedPromptError(f"sweep: {what} {path} holds a {type(data).__name__}, not a run config.")
    return data


def resolve_cell(base: dict, dataset: str | None, method: str | None, flags: list[str], name: str) -> dict:
    """The resolved config of one cell, as ``fedprompt fit`` would resolve it: ``base`` with its data section
    replaced by ``dataset``'s, then ``--method``, then the sweep's run flags."""
    from fedprompt.__main__ import instantiate, parse, prepare

    config = dict(base)
    if dataset:
        data = _read_config(dataset, "--datasets file").get("data")
        if not isinstance(data, dict):
            raise FedPromptError(f"sweep: the --datasets file {dataset} has no data section (data: class_path ...).")
        config["data"] = data
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    try:
        argv = ["fit", "--config", handle.name] + (["--method", method] if method else []) + flags
        prepare(argv)  # the command line's checks, and the chosen method's module imported
        _, parser, parsed = parse(argv)
        _, resolved = instantiate(parser, parsed)
    except FedPromptError as err:
        raise FedPromptError(f"sweep: cell {name}: {err}") from None
    finally:
        os.unlink(handle.name)
    return sweep_config(resolved)


def expand(paths: list[str] | None, flag: str) -> list[str] | None:
    """``--configs`` / ``--datasets`` with their wildcard patterns (``configs/lodo/promptfl_pacs_*.yaml``) expanded,
    sorted; a pattern matching no file is one line."""
    if paths is None:
        return None
    out = []
    for path in paths:
        if not any(ch in path for ch in "*?["):
            out.append(path)
            continue
        matches = sorted(str(p) for p in Path().glob(path)) if not Path(path).is_absolute() else \
            sorted(str(p) for p in Path(path).parent.glob(Path(path).name))
        if not matches:
            raise FedPromptError(f"sweep: {flag} {path} matches no file.")
        out += matches
    return list(dict.fromkeys(out))


def grid_cells(run: RunArgs, options: SweepArgs, out: Path) -> list[Cell]:
    """The cells of the sweep: one (``OUT``) for a single config, else every combination of the axes."""
    from fedprompt.run import run_config

    if not is_grid(options):
        return [Cell("", out, sweep_config(run_config(run)))]
    flags = run_flags(options.command_line) if options.configs else []
    base = sweep_config(run_config(run)) if run.method is not None or run.data is not None else {}
    cells: dict[str, Cell] = {}
    configs, datasets = expand(options.configs, "--configs"), expand(options.datasets, "--datasets")
    for config, method, dataset in itertools.product(configs or [None], options.methods or [None],
                                                     datasets or [None]):
        name = _cell_name(config, method, dataset)
        if name in cells:
            raise FedPromptError(f"sweep: two cells are named {name!r}; give the configs or datasets distinct file "
                                 "names.")
        start = _read_config(config, "--configs file") if config else base
        cells[name] = Cell(name, out / name, resolve_cell(start, dataset, method, flags, name))
    return list(cells.values())


def record_grid(out: Path, cells: list[Cell], seeds: list[int]) -> None:
    """``OUT/grid.yaml``: the grid's cells (those of earlier calls kept, so the table holds them all) and seeds."""
    from fedprompt.federation.checkpoint import write_text

    path = out / GRID_FILE
    old = _read_config(str(path), "grid file") if path.is_file() else {}
    names = list(dict.fromkeys(list(old.get("cells") or []) + [c.name for c in cells]))
    seeds = list(dict.fromkeys(list(old.get("seeds") or []) + list(seeds)))
    write_text(path, yaml.safe_dump({"cells": names, "seeds": seeds}, sort_keys=False))


def grid_folders(path: Path) -> list[Path] | None:
    """The cell folders of a grid folder (``grid.yaml``), or ``None`` when ``path`` is not one."""
    if not (path / GRID_FILE).is_file():
        return None
    return [path / name for name in _read_config(str(path / GRID_FILE), "grid file").get("cells") or []]
