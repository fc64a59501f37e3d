"""``fedprompt sweep`` (:func:`fedprompt.commands.sweep`): run one config over several seeds and report the mean and standard deviation over seeds.

The papers of this field report the mean over 3 seeds; their code (CoOp/Dassl style) runs one output folder per seed
(``.../seed1``, ``seed2``, ``seed3``) and a script then averages the results. ``fedprompt sweep`` does the same in one
command: each seed is an ordinary ``fedprompt fit`` run (a child process) in ``OUT/seed<N>``; then the table of every
seed's final metrics with their mean +- std is printed and written to ``OUT/seeds.md`` and ``OUT/seeds.json``.

Running the same command again continues: finished seeds are kept, an interrupted seed resumes from its
``checkpoints/last.ckpt``, missing seeds run. So seeds can also run elsewhere (one cluster job per seed:
``fedprompt fit --config OUT/sweep.yaml --seed N --data.seed N --out_dir OUT/seedN``) and ``fedprompt sweep`` with the
same arguments then only writes the table.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import yaml

from fedprompt import rundir
from fedprompt.config_keys import raw_keys
from fedprompt.errors import FedPromptError
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
    """``fedprompt sweep`` (see :func:`fedprompt.commands.sweep`)."""
    seeds, same_data = options.seeds, options.same_data
    if run.method is None or run.data is None:
        raise FedPromptError("sweep needs a fit config: --config FILE with method.class_path and data.class_path.")
    if run.resume:
        raise FedPromptError("sweep takes no --resume: run the same sweep command again to continue it.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise FedPromptError(f"--seeds must be a non-empty list of distinct seeds, got {seeds}.")
    config = run_config(run)
    for key in ("seeds", "same_data"):
        config.pop(key, None)
    config.update(out_dir=None, resume=None, overwrite=False)
    out = Path(run.out_dir or f"runs/{run.method.name.lower()}-seeds")
    _prepare(out, config, seeds, run.overwrite)
    try:
        for n in seeds:
            _run_seed(out, n, run.federation.rounds, same_data)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"sweep interrupted; run the same sweep command again to continue ({out}: finished "
                                "seeds are kept, an interrupted seed resumes from its checkpoint).") from None
    table = seed_table({n: out / f"seed{n}" for n in seeds})
    with checked_writes(out / "seeds.json", f"every seed's run is kept in {out}; free space or fix the folder, then "
                                            "run the same sweep command again (it only writes the table)."):
        write_json(out / "seeds.json", table)
        write_text(out / "seeds.md", markdown_table(table) + "\n")
    print(markdown_table(table))
    print(f"-> {out / 'seeds.md'}, {out / 'seeds.json'}")
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


def _run_seed(out: Path, n: int, rounds: int, same_data: bool) -> None:
    run = out / f"seed{n}"
    state = folder_state(run, rounds, _read_summary)
    if state == "done":
        print(f"sweep: seed {n}: complete in {run}", flush=True)
        return
    command = [sys.executable, "-m", "fedprompt", "fit"]
    if state == "resume":
        command += ["--resume", str(run / "checkpoints" / "last.ckpt"), "--federation.rounds", str(rounds)]
        saved = _read_sweep_config(run / "hyperparameters.yaml")
        changed = config_differences(saved, _read_sweep_config(out / "sweep.yaml"))
        if changed:
            raise FedPromptError(f"{run} was run with another config (it differs in {', '.join(changed)}); choose "
                                 "another --out_dir, or pass --overwrite true.")
    else:
        command += ["--config", str(out / "sweep.yaml"), "--seed", str(n), "--out_dir", str(run)]
        command += [] if same_data else ["--data.seed", str(n)]
    print(f"sweep: seed {n}: {' '.join(command[1:])}", flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise FedPromptError(f"sweep: seed {n} stopped (exit status {code}; its message is above). Run the same "
                             "sweep command again to continue: finished seeds are kept.")


def _read_summary(path: Path) -> dict:
    data = read_json(path, "rerun that seed (delete its folder and run the same sweep command again).",
                     f"sweep: {path}")
    if not isinstance(data, dict):
        raise FedPromptError(f"sweep: {path} holds a {type(data).__name__}, not a summary; rerun that seed.")
    return data


def _final_metrics(summary: dict) -> dict:
    chosen = summary.get("selected") or summary  # eval.select: val -> the selected round
    keys = list(METRICS) + [k for k in chosen if k.startswith(METRIC_PREFIXES)]
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
