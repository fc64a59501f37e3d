"""``fedprompt sweep`` (:func:`fedprompt.commands.sweep`): run fit configs over several seeds and report the mean and standard deviation over seeds.

The papers of this field report the mean over 3 seeds; their code (CoOp/Dassl style) runs one output folder per seed
(``.../seed1``, ``seed2``, ``seed3``) and a script then averages the results. ``fedprompt sweep`` does the same in one
command: each seed is an ordinary ``fedprompt fit`` run (a child process or a cluster job) in ``OUT/seed<N>``; then the
table of every seed's final metrics with their mean +- std is printed and written to ``OUT/seeds.md`` and
``OUT/seeds.json``. A grid of configs, methods and datasets (``--configs``, ``--methods``, ``--datasets``) makes one
such sweep folder per cell, ``OUT/<cell>``, and the paper table of all of them (:mod:`fedprompt.grid`; how the runs
are launched: :mod:`fedprompt.launchers`).

Running the same command again continues: finished seeds are kept, an interrupted seed resumes from its
``checkpoints/last.ckpt``, failed and missing seeds run. So seeds can also run elsewhere (one cluster job per seed:
``fedprompt fit --config OUT/sweep.yaml --seed N --data.seed N --out_dir OUT/seedN``) and ``fedprompt sweep`` with the
same arguments then only writes the table.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from fedprompt import rundir
from fedprompt.config_keys import raw_keys
from fedprompt.errors import FedPromptError
from fedprompt.federation.eval_summaries import is_summary_key
from fedprompt.files import checked_writes, read_json, read_yaml, write_json, write_text
from fedprompt.run import RunArgs, SweepArgs, run_config
from fedprompt.run_folder import folder_state

#: summary.json entries averaged over seeds (those a run has)
METRICS = ("local_acc", "local_acc_std", "global_acc", "val_acc", "base_acc", "novel_acc", "hm", "cm",
           "own_classes_acc", "dual_hm", "unseen_acc", "multidomain_acc")
#: prefixes of the per-target and per-domain entries, averaged over seeds too
METRIC_PREFIXES = ("unseen/", "domain/")
#: config keys that may differ between the seeds of one sweep
PER_SEED_KEYS = ("seed", "out_dir", "resume", "overwrite", "federation.rounds", "data.init_args.seed")


def run_sweep(run: RunArgs, options: SweepArgs) -> dict:
    """``fedprompt sweep`` (see :func:`fedprompt.commands.sweep`): the grid's cells prepared, their pending runs
    launched, then the tables (:mod:`fedprompt.grid`)."""
    from fedprompt.grid import grid_cells, is_grid, record_grid
    from fedprompt.launchers import finish, launch

    seeds = options.seeds
    if not is_grid(options) and (run.method is None or run.data is None):
        raise FedPromptError("sweep needs a fit config: --config FILE with method.class_path and data.class_path "
                             "(or a grid: --configs, --methods, --datasets).")
    if run.resume:
        raise FedPromptError("sweep takes no --resume: run the same sweep command again to continue it.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise FedPromptError(f"--seeds must be a non-empty list of distinct seeds, got {seeds}.")
    name = run.method.name.lower() if run.method is not None and not is_grid(options) else "grid"
    out = Path(run.out_dir or f"runs/{name}-seeds")
    cells = grid_cells(run, options, out)
    for cell in cells:
        _prepare(cell.folder, cell.config, seeds, run.overwrite)
    if is_grid(options):
        record_grid(out, cells, seeds)
    results = launch(cells, seeds, options, out)
    return finish(cells, seeds, results, out, is_grid(options))


def write_seed_table(out: Path, seeds: list[int]) -> dict:
    """The seed table of the sweep folder ``out`` (every seed finished), written as ``seeds.json`` and ``seeds.md``."""
    table = seed_table({n: out / f"seed{n}" for n in seeds})
    with checked_writes(out / "seeds.json", f"every seed's run is kept in {out}; free space or fix the folder, then "
                                            "run the same sweep command again (it only writes the table)."):
        write_json(out / "seeds.json", table)
        write_text(out / "seeds.md", markdown_table(table) + "\n")
    return table


def config_differences(a: dict, b: dict) -> list[str]:
    """The dotted keys (besides :data:`PER_SEED_KEYS`) whose values differ between two resolved configs."""
    fa, fb = raw_keys(a), raw_keys(b)
    return [k for k in sorted(set(fa) | set(fb)) if k not in PER_SEED_KEYS and fa.get(k) != fb.get(k)]


def _prepare(out: Path, config: dict, seeds: list[int], overwrite: bool) -> None:
    problem = rundir.not_writable(out)
    if problem:
        raise FedPromptError(problem)
    saved = out / "sweep.yaml"
    if overwrite:
        for n in seeds:
            if (out / f"seed{n}").is_dir():
                rundir.clear(out / f"seed{n}")
        for name in ("sweep.yaml", "seeds.json", "seeds.md"):
            (out / name).unlink(missing_ok=True)
    elif saved.is_file():
        changed = config_differences(_read_sweep_config(saved), config)
        if changed:
            raise FedPromptError(f"out_dir {out} holds a sweep of another config (it differs in {', '.join(changed)}); "
                                 "choose another --out_dir, or pass --overwrite true to delete its runs and start "
                                 "again.")
    elif rundir.holds_run(out):
        raise FedPromptError(f"out_dir {out} holds a run ({rundir.describe(out)}), not a sweep; choose another "
                             "--out_dir.")
    with checked_writes(saved, "no seed was run; free space or fix the folder (or pass another --out_dir), then "
                               "run the command again."):
        write_text(saved, yaml.safe_dump(config, sort_keys=False))


def _read_sweep_config(path: Path) -> dict:
    """A sweep's saved config (``OUT/sweep.yaml``, or a seed's ``hyperparameters.yaml``): one line if it is not
    plain YAML."""
    return read_yaml(path, f"sweep: {path}", "it was changed by something else than fedprompt: restore it, or pass "
                                             "--overwrite true to delete the sweep's runs and start again")


def seed_state(run: Path, rounds: int) -> str:
    """``done`` (a summary of at least ``rounds`` rounds, or of a method that does not train, ZeroShot: a summary
    without a checkpoint), ``resume`` (a checkpoint) or ``new``."""
    state = folder_state(run, rounds, _read_summary)
    if state == "new" and (run / "summary.json").is_file():  # evaluated once, nothing to resume
        return "done"
    return state


def seed_command(out: Path, n: int, same_data: bool) -> list[str] | None:
    """The ``fedprompt`` arguments that run (or resume) seed ``n`` of the sweep folder ``out``; ``None`` when it is
    complete. A resumed seed must have been run with the sweep's config."""
    config = _read_sweep_config(out / "sweep.yaml")
    rounds = int((config.get("federation") or {}).get("rounds") or 1)
    run = out / f"seed{n}"
    state = seed_state(run, rounds)
    if state == "done":
        return None
    if state == "resume":
        changed = config_differences(_read_sweep_config(run / "hyperparameters.yaml"), config)
        if changed:
            raise FedPromptError(f"{run} was run with another config (it differs in {', '.join(changed)}); choose "
                                 "another --out_dir, or pass --overwrite true.")
        return ["fit", "--resume", str(run / "checkpoints" / "last.ckpt"), "--federation.rounds", str(rounds)]
    command = ["fit", "--config", str(out / "sweep.yaml"), "--seed", str(n), "--out_dir", str(run)]
    return command + ([] if same_data else ["--data.seed", str(n)])


def _read_summary(path: Path) -> dict:
    data = read_json(path, "rerun that seed (delete its folder and run the same sweep command again).",
                     f"sweep: {path}")
    if not isinstance(data, dict):
        raise FedPromptError(f"sweep: {path} holds a {type(data).__name__}, not a summary; rerun that seed.")
    return data


def _final_metrics(summary: dict) -> dict:
    chosen = summary.get("selected") or summary  # eval.select: val -> the selected round
    keys = list(METRICS) + [k for k in chosen if k.startswith(METRIC_PREFIXES) or is_summary_key(k)]
    return {k: chosen[k] for k in keys if isinstance(chosen.get(k), (int, float))}


def seed_table(runs: dict[int, Path]) -> dict:
    """Mean and standard deviation over seeds of each final metric of the runs ``{seed: run directory}``.

    The standard deviation is the population one (``ddof=0``, numpy's default); every seed's value is kept, so any
    other statistic can be computed from the JSON.
    """
    summaries = {}
    for n, run in runs.items():
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise FedPromptError(f"sweep: {path} is missing; the run of seed {n} has not finished.")
        summaries[n] = _read_summary(path)
    finals = {n: _final_metrics(s) for n, s in summaries.items()}
    metrics = {}
    for key in dict.fromkeys(k for n in runs for k in finals[n]):
        values = [finals[n].get(key) for n in runs]
        if any(v is None for v in values):
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        metrics[key] = {"mean": mean, "std": std, "values": values}
    first = next(iter(summaries.values()))
    return {"method": first.get("method"), "seeds": list(runs), "runs": {str(n): str(r) for n, r in runs.items()},
            "model_selection": first.get("model_selection"), "std": "population standard deviation (ddof=0)",
            "metrics": metrics}


def markdown_table(table: dict) -> str:
    """The seed table as Markdown: one row per metric, one column per seed, then mean +- std (in %)."""
    seeds = table["seeds"]
    lines = ["| metric | " + " | ".join(f"seed {n}" for n in seeds) + " | mean ± std |",
             "|---|" + "---|" * len(seeds) + "---|"]
    for key, entry in table["metrics"].items():
        cells = " | ".join(f"{100 * v:.2f}" for v in entry["values"])
        lines.append(f"| {key} | {cells} | {100 * entry['mean']:.2f} ± {100 * entry['std']:.2f} |")
    return "\n".join(lines)
