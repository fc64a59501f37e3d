"""How ``fedprompt sweep`` starts its runs (:mod:`fedprompt.grid`): child processes on this machine, or submitit jobs
on a SLURM cluster (or submitit's local executor), and the report and tables once they ended.

Every run goes through :func:`run_one`, on this machine or on a cluster node: claim the run
(``<cell>/.seed<N>.lock``), skip it when it is complete, run or resume it, release the claim.
"""

from __future__ import annotations

import os
import queue
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedprompt import rundir
from fedprompt.errors import FedPromptError, warn
from fedprompt.grid import Cell, Run
from fedprompt.run import SweepArgs


def run_spec(run: Run, same_data: bool, mode: str, env: dict | None = None) -> dict:
    """What :func:`run_one` needs of a run (plain values: a submitit job pickles it). ``mode``: ``stream`` (a child
    process writing to this terminal), ``log`` (a child process writing to ``<cell>/seed<N>.log``) or ``in_process``
    (``fedprompt fit`` in the calling process: a cluster job)."""
    return {"cell": run.cell, "folder": str(run.folder), "seed": run.seed, "same_data": same_data, "mode": mode,
            "log": str(run.folder / f"seed{run.seed}.log"), "env": env}


def run_one(spec: dict) -> dict:
    """Claim, run (or resume) and release one run; ``{"status": "done" | "ok" | "failed" | "running", ...}``."""
    from fedprompt.sweep import seed_command

    folder, seed = Path(spec["folder"]), spec["seed"]
    claim = rundir.RunLock(folder, name=f".seed{seed}.lock")
    problem = claim.acquire()
    if problem is not None:
        return {"status": "running", "detail": problem}
    try:
        command = seed_command(folder, seed, spec["same_data"])
        if command is None:
            return {"status": "done"}
        code = _execute(command, spec)
    finally:
        claim.release()
    return {"status": "ok" if code == 0 else "failed", "code": code,
            "log": spec["log"] if spec["mode"] == "log" else None}


def _execute(command: list[str], spec: dict) -> int:
    """Run ``fedprompt COMMAND`` as ``spec["mode"]`` says; its exit status."""
    label = f"{spec['cell']}/seed {spec['seed']}" if spec["cell"] else f"seed {spec['seed']}"
    if spec["mode"] == "in_process":
        from fedprompt.__main__ import main

        print(f"sweep: {label}: fedprompt {shlex.join(command)}", flush=True)
        try:
            main(command)
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 1
        return 0
    argv = [sys.executable, "-m", "fedprompt", *command]
    print(f"sweep: {label}: fedprompt {shlex.join(command)}", flush=True)
    if spec["mode"] == "stream":
        return subprocess.run(argv, env=spec["env"]).returncode
    with open(spec["log"], "a") as log:
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=spec["env"]).returncode


def visible_gpus() -> list[str]:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else every CUDA device torch sees)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip()]
    import torch

    return [str(k) for k in range(torch.cuda.device_count())]


def launch_local(runs: list[Run], options: SweepArgs) -> dict[Run, dict]:
    """The runs as child processes, ``options.processes`` at a time (one: in order, output on this terminal)."""
    if options.processes == 1:
        return {run: _report(run, run_one(run_spec(run, options.same_data, "stream"))) for run in runs}
    gpus = visible_gpus()
    slots: queue.Queue = queue.Queue()
    for slot in range(options.processes):
        slots.put(slot)

    def work(run: Run) -> dict:
        slot = slots.get()
        try:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else None
            return _report(run, run_one(run_spec(run, options.same_data, "log", env)))
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=options.processes) as pool:
        return dict(zip(runs, pool.map(work, runs)))


def launch_submitit(runs: list[Run], options: SweepArgs, out: Path) -> dict[Run, dict]:
    """One submitit job per run (``slurm``: SLURM; ``submitit-local``: this machine); waits for them with
    ``options.wait``."""
    try:
        import submitit
    except ImportError:
        raise FedPromptError(f"--launcher {options.launcher} needs submitit: pip install 'fedprompt[slurm]'.") from None
    cluster = "local" if options.launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=str(out / "submitit" / "%j"), cluster=cluster)
    try:
        executor.update_parameters(**{"name": "fedprompt-sweep", **(options.slurm or {})})
    except (ValueError, TypeError, NameError) as err:  # submitit: NameError for an unknown parameter
        raise FedPromptError(f"--slurm: {str(err).splitlines()[0]} (submitit's executor parameters, e.g. "
                             "slurm_partition, timeout_min, gpus_per_node, cpus_per_task, mem_gb).") from None
    try:
        with executor.batch():
            jobs = [executor.submit(run_one, run_spec(run, options.same_data, "in_process")) for run in runs]
    except Exception as err:  # sbatch missing or refusing the job
        raise FedPromptError(f"sweep: submitting the jobs to {cluster} failed ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:300]}); check --slurm and that sbatch works here.") from None
    for run, job in zip(runs, jobs):
        print(f"sweep: {run.label}: job {job.job_id} ({cluster}; logs in {out / 'submitit' / str(job.job_id)})",
              flush=True)
    if not options.wait:
        return {run: {"status": "submitted", "detail": f"job {job.job_id}"} for run, job in zip(runs, jobs)}
    return {run: _report(run, _job_result(job)) for run, job in zip(runs, jobs)}


def _job_result(job) -> dict:
    """A finished job's :func:`run_one` result; a job that crashed, timed out or was cancelled is failed."""
    try:
        return job.result()
    except Exception as err:  # submitit's FailedJobError / UncompletedJobError
        last = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        return {"status": "failed", "code": None, "detail": last[0].strip()[:300], "log": str(job.paths.stderr)}


def _report(run: Run, result: dict) -> dict:
    status = result["status"]
    if status == "failed":
        where = f"; log {result['log']}" if result.get("log") else ""
        print(f"sweep: {run.label}: FAILED (exit status {result.get('code')}{where})", flush=True)
    elif status == "running":
        print(f"sweep: {run.label}: running in another process, left to it ({result['detail']})", flush=True)
    elif status == "ok" and result.get("log"):
        print(f"sweep: {run.label}: finished", flush=True)
    return result


def launch(cells: list[Cell], seeds: list[int], options: SweepArgs, out: Path) -> dict[Run, dict]:
    """Run every (cell, seed) that is not complete with ``options.launcher``; the result of each."""
    from fedprompt.sweep import seed_command

    results, todo = {}, []
    for cell in cells:
        for seed in seeds:
            run = Run(cell.name, cell.folder, seed)
            if seed_command(cell.folder, seed, options.same_data) is None:
                print(f"sweep: {run.label}: complete in {cell.folder / f'seed{seed}'}", flush=True)
                results[run] = {"status": "done"}
            else:
                todo.append(run)
    try:
        if todo and options.launcher == "local":
            results.update(launch_local(todo, options))
        elif todo:
            results.update(launch_submitit(todo, options, out))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"sweep interrupted; run the same sweep command again to continue ({out}: finished "
                                "seeds are kept, an interrupted seed resumes from its checkpoint).") from None
    return results


def finish(cells: list[Cell], seeds: list[int], results: dict[Run, dict], out: Path, grid: bool) -> dict:
    """The seed table of every complete cell, a grid's paper table, and the report: the failed runs in one error;
    runs left to another process or to the cluster in one note."""
    from fedprompt.sweep import markdown_table, seed_state, write_seed_table

    tables = {}
    for cell in cells:
        rounds = int((cell.config.get("federation") or {}).get("rounds") or 1)
        if all(seed_state(cell.folder / f"seed{n}", rounds) == "done" for n in seeds):
            tables[cell.name] = write_seed_table(cell.folder, seeds)
    if not grid and "" in tables:
        print(markdown_table(tables[""]))
        print(f"-> {out / 'seeds.md'}, {out / 'seeds.json'}")
    if grid and tables:
        _grid_table(out, [c for c in cells if c.name in tables])
    failed = [(run, r) for run, r in results.items() if r["status"] == "failed"]
    waiting = [run for run, r in results.items() if r["status"] in ("running", "submitted")]
    if waiting:
        warn(f"sweep: {len(waiting)} run(s) still running ({', '.join(r.label for r in waiting[:4])}"
             f"{' ...' if len(waiting) > 4 else ''}); run the same sweep command once they ended to write their "
             "tables.")
    if failed:
        shown = "; ".join(f"{run.label} (exit status {r.get('code')}" + (f", log {r['log']}" if r.get("log") else "")
                          + (f": {r['detail']}" if r.get("detail") else "") + ")" for run, r in failed[:5])
        raise FedPromptError(f"sweep: {len(failed)} of {len(results)} run(s) failed: {shown}"
                             f"{' ...' if len(failed) > 5 else ''}. Their messages are above (or in their logs); "
                             "run the same sweep command again to retry them: finished runs are kept.")
    return tables.get("", {}) if not grid else {"cells": tables, "folder": str(out)}


def _grid_table(out: Path, cells: list[Cell]) -> None:
    """The paper table of a grid's complete cells (``OUT/table.md``, ``.csv``, ``.png``)."""
    from fedprompt.run import TableArgs
    from fedprompt.table import make_table

    try:
        make_table(TableArgs(runs=[str(c.folder) for c in cells], out=str(out / "table")))
    except FedPromptError as err:
        warn(f"sweep: the grid's table was not written ({err}); write it with fedprompt table and its options.")
