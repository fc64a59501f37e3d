"""``fedprompt table RUN_DIRS...`` (:func:`fedprompt.commands.table`): the paper table from run directories.

Each directory is a ``fedprompt fit`` run (``summary.json`` + ``hyperparameters.yaml``), a ``fedprompt sweep``
folder (``seeds.json``, ``sweep.yaml`` and one ``seed<N>/`` run per seed) or a sweep's grid folder (``grid.yaml``: each
cell's sweep folder). A run contributes one value per seed of
each metric (the selected round's with ``eval.select: val``, else the last round's); runs given separately that
differ only in their seeds count as seeds of one cell. The table has one row per method (its name, ``(central)``
for ``federation.central``, or a label given with ``--labels``) and its columns are, by ``--columns``:

- ``datasets``: one metric (``--metric``, default the first of local_acc, own_classes_acc, global_acc that every run
  has) per dataset, plus their average when there are several;
- ``metrics``: for each dataset, the metrics in ``--metrics`` (default Local / Base / Novel / HM: local_acc,
  base_acc, novel_acc, hm);
- ``targets``: for each source dataset, its own accuracy (``--metric``; default global_acc, else local_acc) then every
  target dataset of a cross-dataset / cross-domain run (``unseen/<target>``) and their mean (``unseen_acc``).

A cell is the mean +- standard deviation over seeds (population std, as ``fedprompt sweep``), in %; the best mean of
each column is marked (bold in Markdown, ``best`` in the CSV): the highest, or the lowest for an FPR (OOD
detection's ``ood/<set>/<score>/fpr95``). The table is written as Markdown (``OUT.md``, also
printed), CSV (``OUT.csv``, one row per cell: method, group, column, metric, mean, std, seeds, values, best) and
drawn as a figure (``OUT.png``: one bar chart per column group, error bars = std; needs matplotlib, the ``plot``
extra).

A column compares runs of one protocol: the same data (reader, partition, shots, classes, validation; paths and
seeds aside), evaluation (``eval.mode``, ``eval.domains``, ``eval.select``), backbone and drop rate. Runs of one
dataset whose protocols differ stop the command with one line naming them and the settings that differ.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from fedprompt.config_keys import raw_keys
from fedprompt.errors import FedPromptError, warn
from fedprompt.files import checked_writes, read_json, read_yaml, write_all
from fedprompt.run import TableArgs
from fedprompt.table_metrics import HM_LEGEND, derived, domain_columns, draw_reliability, metric_name, row_tallies

#: config keys whose values differ between the seeds of one result
PER_SEED = ("seed", "data.init_args.seed")
#: config keys (last component) that say where things are, never what was computed
LOCAL = ("root", "dirname", "num_workers", "check_images", "on_bad_image", "download", "cache_dir")
#: config keys outside ``data`` that belong to the protocol of a column
PROTOCOL = ("eval.mode", "eval.domains", "eval.select", "backbone.model", "backbone.pretrained",
            "federation.drop_rate")
#: config sections that never change a result (logging, devices, paths)
IGNORED = ("log.", "fabric.", "out_dir", "resume", "overwrite", "eval.every", "eval.batch_size",
           "federation.parallel_clients", "train.compile", "resolved_config")
DEFAULT_METRICS = ("local_acc", "base_acc", "novel_acc", "hm")
AUTO_METRICS = ("local_acc", "own_classes_acc", "global_acc")
NAMES = {"local_acc": "Local", "base_acc": "Base", "novel_acc": "Novel", "hm": "HM", "cm": "CM",
         "global_acc": "Global", "own_classes_acc": "Local (own classes)", "val_acc": "Val", "dual_hm": "HM (dual)",
         "unseen_acc": "Mean", "multidomain_acc": "Multi-domain", "average": "Average"}


def _local(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in LOCAL


def settings(config: dict) -> dict:
    """What a run computed: its flat config without seeds, paths, logging and devices."""
    return {k: v for k, v in raw_keys(config).items() if k not in PER_SEED and not _local(k)
            and not k.startswith(IGNORED)}


def protocol(config: dict) -> dict:
    """The protocol of a run's column (see the module docstring)."""
    out = {}
    for key, value in raw_keys(config).items():
        if key in PER_SEED or _local(key):
            continue
        if key.startswith("data.") or key in PROTOCOL:
            if key == "backbone.pretrained" and isinstance(value, str):
                value = Path(value).name  # a local model folder may sit elsewhere on another machine
            out[key] = value
    out.setdefault("eval.mode", "personal")  # runs from before eval.mode
    return out


def dataset_name(data: dict) -> str:
    """A column name for a run's data config: the dataset folder's name, else the reader's name (a Transfer run:
    its source's; a Combined run: its datasets' joined by +)."""
    data = data or {}
    reader = str(data.get("class_path", "data")).rsplit(".", 1)[-1]
    args = data.get("init_args") or {}
    if reader == "Transfer":
        return dataset_name(args.get("source"))
    if reader == "Combined":
        return "+".join(dataset_name(d) for d in args.get("datasets") or [])
    if reader == "LeaveOneDomainOut":  # one column per held-out domain
        return f"{dataset_name(args.get('dataset'))}/{args.get('target')}"
    if reader == "LongTailed":
        return f"{dataset_name(args.get('dataset'))} LT (IF {1 / float(args.get('imbalance_factor') or 0.01):g})"
    if args.get("root"):
        return Path(str(args["root"])).name
    return str(args.get("dirname") or reader.lower())


@dataclass
class Result:
    """One row x dataset of the table: the summaries of its seeds and the config they share."""

    label: str
    dataset: str
    config: dict
    paths: list[Path]
    seeds: dict[int, dict] = field(default_factory=dict)

    def values(self, metric: str) -> list[float] | None:
        """The metric of every seed (``None`` when a seed lacks it)."""
        out = []
        for summary in self.seeds.values():
            chosen = summary.get("selected") or summary
            value = chosen.get(metric)
            if value is None:  # a run folder from before the metric: derived from what its summary holds
                value = derived(chosen, metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return None
            out.append(float(value))
        return out

    def metric_keys(self) -> list[str]:
        keys: dict[str, None] = {}
        for summary in self.seeds.values():
            keys.update(dict.fromkeys(summary.get("selected") or summary))
        return list(keys)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FedPromptError(f"table: {path} is missing; the run directory is incomplete.")
    return read_yaml(path, f"table: {path}", "rerun the run that wrote it")


def _read_json(path: Path) -> dict:
    data = read_json(path, "rerun the run that wrote it.", f"table: {path}")
    if not isinstance(data, dict):
        raise FedPromptError(f"table: {path} holds a {type(data).__name__}, not a mapping; "
                             "rerun the run that wrote it.")
    return data


def _read_summary(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FedPromptError(f"table: {path} is missing; {what} has not finished (rerun it to complete it).")
    return _read_json(path)


def load(path: Path) -> list[tuple[Path, dict, int, dict]]:
    """``(run dir, config, seed, summary)`` of a run directory, of every seed of a sweep folder, or of every cell of
    a grid folder (``fedprompt sweep`` with ``--configs``, ``--methods`` or ``--datasets``)."""
    from fedprompt.grid import grid_folders

    cells = grid_folders(path)
    if cells is not None:
        return [item for cell in cells for item in load(cell)]
    if (path / "seeds.json").is_file():
        seeds = _read_json(path / "seeds.json").get("seeds") or []
        config = _read_yaml(path / "sweep.yaml")
        return [(path, config, int(n), _read_summary(path / f"seed{n}" / "summary.json", f"seed {n} of the sweep"))
                for n in seeds]
    if (path / "summary.json").is_file():
        config = _read_yaml(path / "hyperparameters.yaml")
        return [(path, config, int(config.get("seed", 0) or 0), _read_summary(path / "summary.json", "the run"))]
    raise FedPromptError(f"table: {path} is neither a fedprompt run directory (summary.json) nor a sweep folder "
                         "(seeds.json) nor a grid folder (grid.yaml); give the folders fedprompt fit or fedprompt sweep "
                         "wrote.")


def row_label(path: Path, config: dict, summary: dict, labels: dict[str, str]) -> str:
    for key in (str(path), path.name, str(path.resolve())):
        if key in labels:
            return labels[key]
    method = config.get("method") or {}
    name = summary.get("method") or str(method.get("class_path", "method")).rsplit(".", 1)[-1]
    return name + (" (central)" if (config.get("federation") or {}).get("central") else "")


def collect(paths: list[str], labels: dict[str, str]) -> list[Result]:
    """The results of the run directories, runs of one row and dataset merged as seeds of one result."""
    results: dict[tuple[str, str], Result] = {}
    for name in paths:
        for path, config, seed, summary in load(Path(name)):
            label, dataset = row_label(path, config, summary, labels), dataset_name(config.get("data"))
            result = results.get((label, dataset))
            if result is None:
                results[(label, dataset)] = Result(label, dataset, config, [path], {seed: summary})
                continue
            mine, theirs = settings(config), settings(result.config)
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if differ:
                raise FedPromptError(f"table: {path} and {result.paths[0]} are both {label} on {dataset} but differ in "
                                     f"{', '.join(differ[:6])}; give each variant its own row with --labels "
                                     f"'{{\"{path}\": \"{label} (variant)\"}}'.")
            if seed in result.seeds:
                raise FedPromptError(f"table: {path} and {result.paths[0]} are both {label} on {dataset} with seed "
                                     f"{seed}; give each seed once.")
            result.seeds[seed] = summary
            if path not in result.paths:
                result.paths.append(path)
    return list(results.values())


def check_protocols(results: list[Result]) -> None:
    """Every dataset's results share one protocol; else one error naming the runs and the settings that differ."""
    by_dataset: dict[str, list[Result]] = {}
    for result in results:
        by_dataset.setdefault(result.dataset, []).append(result)
    for dataset, members in by_dataset.items():
        first = protocol(members[0].config)
        for other in members[1:]:
            theirs = protocol(other.config)
            differ = sorted(k for k in set(first) | set(theirs) if first.get(k) != theirs.get(k))
            if differ:
                shown = ", ".join(f"{k} ({first.get(k)!r} vs {theirs.get(k)!r})" for k in differ[:4])
                more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
                raise FedPromptError(f"table: the column {dataset} mixes protocols: {members[0].paths[0]} "
                                     f"({members[0].label}) and {other.paths[0]} ({other.label}) differ in {shown}"
                                     f"{more}; a column compares runs of one protocol (data split, evaluation, "
                                     "backbone).")


@dataclass
class Column:
    """One column: its group (a dataset or a metric), its header, the dataset it reads and the metric."""

    group: str
    header: str
    dataset: str
    metric: str


def _display(metric: str) -> str:
    if metric.startswith(("unseen/", "domain/")):
        return metric.split("/", 1)[1]
    return metric_name(metric, NAMES)


def known_metrics(results: list[Result]) -> list[str]:
    """The metrics the runs have: the summary.json keys with a number, or null (no finite value: an epsilon
    without noise), in at least one seed of one run."""
    found: dict[str, None] = {}
    for result in results:
        for summary in result.seeds.values():
            chosen = summary.get("selected") or summary
            found.update(dict.fromkeys(k for k, v in chosen.items()
                                       if v is None or isinstance(v, (int, float)) and not isinstance(v, bool)))
    return sorted(found)


def check_metric_names(results: list[Result], names: list[str], flag: str) -> None:
    """Every metric named with ``flag`` is one the runs have; else one line listing the ones they have."""
    known = known_metrics(results)
    unknown = [name for name in names  # a metric an older run folder determines counts (table_metrics.derived)
               if name not in known and all(r.values(name) is None for r in results)]
    if unknown:
        what = "this metric" if len(unknown) == 1 else "these metrics"
        raise FedPromptError(f"table: {flag} {', '.join(unknown)}: no run has {what}; the runs' metrics (summary.json "
                             f"keys): {', '.join(known) or 'none'}.")


def _auto_metric(results: list[Result], candidates: tuple[str, ...], option: str) -> str:
    if option != "auto":
        check_metric_names(results, [option], "--metric")
        return option
    for metric in candidates:
        if all(r.values(metric) is not None for r in results):
            return metric
    have = known_metrics(results)
    raise FedPromptError(f"table: no metric of {', '.join(candidates)} is in every run; pass --metric (the runs "
                         f"have: {', '.join(have)}).")


def columns(results: list[Result], options: TableArgs) -> list[Column]:
    """The table's columns for ``options.columns`` (module docstring)."""
    datasets = list(dict.fromkeys(r.dataset for r in results))
    of = {d: [r for r in results if r.dataset == d] for d in datasets}
    if options.columns == "domains":
        return domain_columns(results, options.metric, Column)
    if options.columns == "datasets":
        metric = _auto_metric(results, AUTO_METRICS, options.metric)
        cols = [Column(_display(metric), d, d, metric) for d in datasets]
        if len(datasets) > 1:
            cols.append(Column(_display(metric), "Average", "", "average"))
        return cols
    if options.columns == "metrics" and options.metrics:
        check_metric_names(results, list(options.metrics), "--metrics")
    cols = []
    for d in datasets:
        if options.columns == "metrics":
            wanted = list(options.metrics or DEFAULT_METRICS)
            metrics = [m for m in wanted if any(r.values(m) is not None for r in of[d])]
            if not metrics:
                raise FedPromptError(f"table: the runs on {d} have none of the metrics {', '.join(wanted)}; pass "
                                     "--metrics with metrics of summary.json.")
        else:
            source = _auto_metric(of[d], ("global_acc", "local_acc", "own_classes_acc"), options.metric)
            targets = [k for r in of[d] for k in r.metric_keys() if k.startswith("unseen/")]
            if not targets:
                raise FedPromptError(f"table: --columns targets needs cross-dataset or cross-domain runs (data: "
                                     f"fedprompt.data.Transfer); the runs on {d} have no unseen/<target> metric.")
            metrics = [source, *dict.fromkeys(targets), "unseen_acc"]
        header = (lambda m: f"{d}: {_display(m)}") if len(datasets) > 1 else _display
        cols.extend(Column(d, header(m), d, m) for m in metrics)
    return cols


@dataclass
class Cell:
    mean: float | None
    std: float | None
    values: list[float]
    best: bool = False


#: metrics (a key's last part) where lower is better: a column's best is its minimum (OOD detection's FPR95, the
#: calibration error); also every ``*_ece`` and every spread over clients ``<metric>_std``
LOWER_IS_BETTER = ("fpr95", "ece")


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of ``metric`` is better (``ood/<set>/<score>/fpr95``, ``ece``, ``target_ece``,
    ``local_acc_std``)."""
    name = metric.rsplit("/", 1)[-1]
    return name in LOWER_IS_BETTER or name.endswith(("_ece", "_std"))


def _stats(values: list[float] | None) -> Cell:
    if not values:
        return Cell(None, None, [])
    mean = sum(values) / len(values)
    return Cell(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), values)


def _lower_is_better(cols: list[Column], col: Column) -> bool:
    """Whether the best of ``col`` is its lowest mean (an ECE or a spread; a mean column: of such columns only)."""
    if col.metric not in ("average", "mean"):
        return lower_is_better(col.metric)
    parts = [c.metric for c in cols if c.metric not in ("average", "mean")
             and (col.metric == "average" or c.group == col.group)]
    return bool(parts) and all(lower_is_better(m) for m in parts)


def build(results: list[Result], cols: list[Column]) -> tuple[list[str], dict[tuple[str, int], Cell]]:
    """Row labels and the cell of every (row, column index); the best mean of each column marked."""
    rows = list(dict.fromkeys(r.label for r in results))
    index = {(r.label, r.dataset): r for r in results}
    cells: dict[tuple[str, int], Cell] = {}
    for j, col in enumerate(cols):
        for row in rows:
            if col.metric in ("average", "mean"):  # of every column, or (mean) of the columns of its group
                means = [cells[(row, i)].mean for i, c in enumerate(cols) if c.metric not in ("average", "mean")
                         and (col.metric == "average" or c.group == col.group)]
                cell = Cell(sum(means) / len(means), None, []) if None not in means else Cell(None, None, [])
            else:
                result = index.get((row, col.dataset))
                cell = _stats(result.values(col.metric) if result is not None else None)
            cells[(row, j)] = cell
        pick = min if _lower_is_better(cols, col) else max
        best = pick((c.mean for (_, i), c in cells.items() if i == j and c.mean is not None), default=None)
        for row in rows:
            cell = cells[(row, j)]
            cell.best = best is not None and cell.mean is not None and abs(cell.mean - best) <= 1e-12
    return rows, cells


def _text(cell: Cell) -> str:
    if cell.mean is None:
        return "–"
    text = f"{100 * cell.mean:.2f}"
    if len(cell.values) > 1:
        text += f" ± {100 * cell.std:.2f}"
    return f"**{text}**" if cell.best else text


def markdown(rows: list[str], cols: list[Column], cells: dict, results: list[Result]) -> str:
    """The table as Markdown (values in %)."""
    seeds = sorted({len(r.seeds) for r in results})
    counts = " or ".join(str(n) for n in seeds)
    groups = list(dict.fromkeys(c.group for c in cols))
    caption = (f"{', '.join(groups)}: mean ± std over {counts} seed(s) (population std), in %; best per column in "
               "bold" + (" (the lowest ECE, std or FPR95)." if any(_lower_is_better(cols, c) for c in cols) else "."))
    legend = list(dict.fromkeys(HM_LEGEND[c.metric] for c in cols if c.metric in HM_LEGEND))
    caption += "".join(f" {line}." for line in legend)
    lines = [caption, "", "| method | " + " | ".join(c.header for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_text(cells[(row, j)]) for j in range(len(cols))) + " |")
    return "\n".join(lines)


def csv_text(rows: list[str], cols: list[Column], cells: dict) -> str:
    """The table as CSV: one row per cell (method, group, column, dataset, metric, mean, std, seeds, values,
    best)."""
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(["method", "group", "column", "dataset", "metric", "mean", "std", "seeds", "values", "best"])
    for row in rows:
        for j, col in enumerate(cols):
            cell = cells[(row, j)]
            writer.writerow([row, col.group, col.header, col.dataset, col.metric,
                             "" if cell.mean is None else f"{cell.mean:.6f}",
                             "" if cell.std is None else f"{cell.std:.6f}", len(cell.values),
                             " ".join(f"{v:.6f}" for v in cell.values), str(cell.best).lower()])
    return handle.getvalue()


def figure(rows: list[str], cols: list[Column], cells: dict, tallies: dict | None = None) -> bytes | None:
    """One bar chart per column group (bars: methods; error bars: std) and, with the rows' calibration ``tallies``,
    their reliability diagram, as PNG bytes; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys(c.group for c in cols))
    widths = [max(2.5, 0.9 * sum(c.group == g for c in cols) * max(1, len(rows)) * 0.35 + 1.5) for g in groups]
    widths += [3.6] if tallies else []
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    if tallies:
        draw_reliability(axes[0][-1], tallies)
    bar = 0.8 / max(1, len(rows))
    for ax, group in zip(axes[0], groups):
        members = [(j, c) for j, c in enumerate(cols) if c.group == group]
        for k, row in enumerate(rows):
            xs, heights, errors = [], [], []
            for x, (j, _) in enumerate(members):
                cell = cells[(row, j)]
                if cell.mean is not None:
                    xs.append(x - 0.4 + bar * (k + 0.5))
                    heights.append(100 * cell.mean)
                    errors.append(100 * (cell.std or 0.0))
            ax.bar(xs, heights, bar, yerr=errors, capsize=2, label=row)
        ax.set_xticks(range(len(members)))
        labels = [c.header.split(": ", 1)[-1] for _, c in members]
        ax.set_xticklabels(labels, rotation=30 if len(members) > 3 else 0, ha="right" if len(members) > 3 else "center")
        ax.set_title(group)
        ax.set_ylabel("accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    plt.close(fig)
    return buffer.getvalue()


def write_table(out: Path, text: str, csv_data: str, png: bytes | None, want_figure: bool) -> list[Path]:
    """Write OUT.md, OUT.csv and OUT.png (when drawn) all or none (a failed write is one line; no file of the table
    is changed then); returns the files written."""
    md, csv_path, png_path = (out.with_name(out.name + ext) for ext in (".md", ".csv", ".png"))
    files = [(md, (text + "\n").encode()), (csv_path, csv_data.encode())]
    if png is not None:
        files.append((png_path, png))
    elif want_figure:
        warn("table: the figure needs matplotlib (pip install 'fedprompt[plot]'); wrote the Markdown and CSV.")
    shown = f"the table {out}.md" + (", .csv and .png" if png is not None else " and .csv")
    with checked_writes(shown, "no file of the table was changed and the run directories are only read; pass "
                               "--out with a writable place (OUT without extension)."):
        write_all(files)
    return [path for path, _ in files]


def make_table(options: TableArgs) -> dict:
    """``fedprompt table`` (see :func:`fedprompt.commands.table`); returns the table as a dict."""
    if not options.runs:
        raise FedPromptError("table needs run directories: fedprompt table RUN_DIR [RUN_DIR ...].")
    results = collect(list(options.runs), dict(options.labels or {}))
    check_protocols(results)
    cols = columns(results, options)
    rows, cells = build(results, cols)
    text = markdown(rows, cols, cells, results)
    written = write_table(Path(options.out), text, csv_text(rows, cols, cells),
                          figure(rows, cols, cells, row_tallies(results)) if options.figure else None,
                          options.figure)
    print(text)
    print("-> " + ", ".join(str(p) for p in written))
    return {"rows": rows, "columns": [c.header for c in cols],
            "cells": {row: {cols[j].header: {"mean": c.mean, "std": c.std, "values": c.values, "best": c.best}
                            for (r, j), c in cells.items() if r == row} for row in rows},
            "files": [str(p) for p in written]}
