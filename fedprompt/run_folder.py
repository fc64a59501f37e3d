"""The run-folder driver: one run directory, written the same way by every command and runtime.

``fedprompt fit`` (either runtime), ``evaluate``, ``zeroshot``, the seeds of ``sweep`` (each an ordinary ``fit``)
and the Flower ServerApp all write their run directory through :class:`RunFolder` (the contract is in the design
notes: hyperparameters.yaml, metrics.jsonl, summary.json, checkpoints/):

- **resume** (:func:`open_run`): the checkpoint to continue is read and checked against the config before anything
  else (:func:`fedprompt.federation.checkpoint.check_resume`); a resumed run continues in its own folder, and a
  complete one changes nothing (:func:`completed_run`);
- **claim and lock** (:meth:`RunFolder.claimed`): rank 0 checks that the folder can be written, takes its one-writer
  lock (:class:`fedprompt.rundir.RunLock`) and checks that it holds no other run; a folder made for a run that
  fails before writing anything is removed again; Ctrl-C becomes :class:`Interrupted`, whose message names what the
  folder holds and the command that resumes it;
- **check then write** (:meth:`RunFolder.prepare`): only once the data, the weights and the checkpoint's fit were
  checked does the first file change (``--overwrite`` clears the old run then); a failed write is one line naming
  the folder and what was kept;
- **per round** (:meth:`RunFolder.train`): the round driver's row goes to metrics.jsonl and the logger, then
  checkpoints/last.ckpt, the best round (``eval.select: val``: checkpoints/best.ckpt) and the every-N checkpoints;
- **summary**: summary.json from the last row (and the selected round), and the per-client table on the console.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch
import yaml
from fedprompt.progress import tqdm

from fedprompt import rundir
from fedprompt.errors import FedPromptError, warn
from fedprompt.files import write_problem
from fedprompt.federation.checkpoint import append_jsonl, check_resume, load_checkpoint, read_jsonl, \
    save_checkpoint, write_json, write_jsonl, write_text
from fedprompt.federation.round import SilentRounds
from fedprompt.federation.eval_summaries import is_summary_key
from fedprompt.federation.scenarios import scenario_keys, scenario_line
from fedprompt.loggers import build_logger, log_client_table, logger_run_id, numeric_metrics, save_logger
from fedprompt.paths import missing_dirs, remove_if_left_empty
from fedprompt.run import RunArgs, run_config, setting_default


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command; its message names the run directory and the exact command that resumes it."""


def open_run(mode: str, run: RunArgs) -> tuple[RunArgs, dict | None]:
    """The run's settings and the checkpoint it continues (``--resume``; ``None`` otherwise), checked against each
    other before anything loads; a resumed run continues in its checkpoint's folder."""
    run = replace(run)  # settings filled in below (the resumed run's folder, the config) stay local
    checkpoint = load_checkpoint(run.resume) if run.resume else None
    if checkpoint is not None:
        origin = rundir.run_dir_of(run.resume)
        if run.out_dir is None and origin is not None:
            run.out_dir = str(origin)
    if run.resolved_config is None:  # a run started from Python: its config, fixed before anything runs
        run.resolved_config = run_config(run)
    if checkpoint is not None:
        check_resume(checkpoint, run.resume, run.method.name, run.method.hparams(),
                     config=run_config(run) if mode == "fit" else None,
                     default_of=lambda key: setting_default(run, key))
    return run, checkpoint


def completed_run(run: RunArgs, checkpoint: dict | None) -> dict | None:
    """``fit --resume`` of a run that already reached ``federation.rounds``: say so and change nothing; returns its
    summary (``None`` when the run is not complete, or its summary.json is missing: the run then rewrites it from
    metrics.jsonl)."""
    if checkpoint is None or checkpoint["round"] < run.federation.rounds:
        return None
    if run.out_dir is None or not (Path(run.out_dir) / "summary.json").is_file():
        return None
    out_dir = Path(run.out_dir)
    done, rounds = checkpoint["round"], run.federation.rounds
    more = (f"it has {done} rounds, more than --federation.rounds {rounds}" if done > rounds
            else f"round {done} of {rounds}")
    print(f"fedprompt: the run in {out_dir} is complete ({more}); nothing changed. Raise --federation.rounds to "
          "continue it.", flush=True)
    return json.loads((out_dir / "summary.json").read_text())


def folder_state(folder: Path, rounds: int, read_summary=None) -> str:
    """Where the fit run in ``folder`` stands: ``done`` (a summary of at least ``rounds`` rounds), ``resume`` (a
    checkpoint to continue) or ``new`` (used by ``fedprompt sweep`` for each seed's folder). ``read_summary`` reads
    a summary.json (the caller's one-line error for a damaged file; default: plain JSON)."""
    summary = Path(folder) / "summary.json"
    read = read_summary or (lambda path: json.loads(path.read_text()))
    if summary.is_file() and (read(summary).get("rounds") or 0) >= rounds:
        return "done"
    return "resume" if (Path(folder) / "checkpoints" / "last.ckpt").is_file() else "new"


class RunFolder:
    """One command's run directory (see the module docstring).

    Args:
        fabric: Lightning Fabric (rank 0 writes; the others follow its decisions).
        mode: ``fit``, ``zeroshot`` or ``evaluate``.
        run: the run's settings.
    """

    def __init__(self, fabric, mode: str, run: RunArgs):
        self.fabric = fabric
        self.mode = mode
        self.run = run
        out = run.out_dir or f"runs/{run.method.name.lower()}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.out_dir = Path(fabric.broadcast(out, src=0))  # every rank gets rank 0's folder
        self.writer = fabric.global_rank == 0
        self.saved: int | None = None  # the round checkpoints/last.ckpt holds (None: nothing written yet)

    # ------------------------------------------------------------------------------------- claim and lock
    @contextmanager
    def claimed(self):
        """Hold the folder for this command (see the module docstring); nothing is deleted here: ``--overwrite``
        clears the old run only once the new run's checks passed."""
        created = missing_dirs(self.out_dir) if self.writer else []
        lock = rundir.RunLock(self.out_dir)
        try:
            with remove_if_left_empty(created):
                problem = None
                if self.writer:
                    problem = (rundir.not_writable(self.out_dir) or lock.acquire()
                               or rundir.claim_problem(self.out_dir, self.mode, self.run.resume, self.run.overwrite))
                problem = self.fabric.broadcast(problem, src=0)
                try:
                    if problem:
                        raise FedPromptError(problem)
                    yield self
                finally:
                    lock.release()
        except KeyboardInterrupt:
            raise Interrupted(self.interrupt_message()) from None

    def interrupt_message(self) -> str:
        out_dir, last = self.out_dir, self.out_dir / "checkpoints" / "last.ckpt"
        if self.mode != "fit":  # zeroshot and evaluate write their files at the end
            return f"interrupted; nothing was written to {out_dir}. Run the same command again."
        if last.is_file():
            done = torch.load(last, map_location="cpu", weights_only=True)["round"]
            return (f"interrupted; {out_dir} holds round {done} of {self.run.federation.rounds} in "
                    f"checkpoints/last.ckpt. Resume with: {rundir.resume_command(out_dir)}")
        if not (out_dir / "hyperparameters.yaml").is_file():
            return f"interrupted before the run started; nothing was written to {out_dir}."
        config = shlex.quote(str(out_dir / "hyperparameters.yaml"))
        return (f"interrupted before the first round was saved; nothing to resume in {out_dir}. Start again with: "
                f"fedprompt fit --config {config} --out_dir {shlex.quote(str(out_dir))}")

    # ------------------------------------------------------------------------------------ check then write
    @contextmanager
    def writing(self):
        """A failed write (a full disk, a read-only or vanished folder) is one line naming the folder and what was
        kept."""
        try:
            yield
        except OSError as err:
            raise FedPromptError(self.write_problem(err)) from None

    def write_problem(self, err: OSError) -> str:
        if self.saved is None:
            kept = "nothing of this run was changed. Free space or fix the folder, then run the command again."
        elif self.saved == 0:
            kept = "no round was saved yet. Free space or fix the folder, then run the command again."
        else:
            kept = (f"checkpoints/last.ckpt keeps round {self.saved} and metrics.jsonl its rows. Free space or fix "
                    f"the folder, then resume: {rundir.resume_command(self.out_dir)}")
        return write_problem(f"the run directory {self.out_dir}", err, kept)

    def _begin_writing(self) -> None:
        """Every check passed and the run writes its first file: with ``--overwrite`` the old run goes now."""
        if self.writer and self.run.overwrite and self.mode != "evaluate" and rundir.holds_run(self.out_dir):
            rundir.clear(self.out_dir)

    def _write_start(self, bad_images) -> None:
        self._begin_writing()
        write_text(self.out_dir / "hyperparameters.yaml", yaml.safe_dump(run_config(self.run), sort_keys=False))
        if bad_images:
            write_text(self.out_dir / "bad_images.txt", "".join(f"{p}\t{why}\n" for p, why in bad_images))

    def prepare(self, checkpoint: dict | None, bad_images=()) -> list[dict]:
        """Rank 0 of fit, once every check passed: clear the old run (``--overwrite``), write hyperparameters.yaml
        and the list of left-out images, keep the metrics rows up to the checkpoint (a torn last row, cut short by
        a crash or a full disk, is dropped with a warning); returns those rows (empty on the other ranks)."""
        done = checkpoint["round"] if checkpoint else 0
        self.saved = done if checkpoint else None
        if not self.writer:
            return []
        torn: list[str] = []
        path = self.out_dir / "metrics.jsonl"
        rows = [r for r in read_jsonl(path, torn) if r["round"] <= done] if checkpoint else []
        if torn:
            warn(f"{path}: dropped its torn last line (a write cut short by a crash or a full disk); the run "
                 f"continues from checkpoints/last.ckpt (round {done}) and the CSV log is rebuilt.")
        with self.writing():
            self._write_start(bad_images)
            write_jsonl(path, rows)
        self.saved = done
        return rows

    # -------------------------------------------------------------------------------------------- the rounds
    def train(self, driver, checkpoint: dict | None, bad_images=(), extra=None, on_round=None) -> dict:
        """Run the rounds of ``driver`` from the checkpoint's next one to ``federation.rounds`` and write the run
        directory; returns the summary (on every rank). ``extra()``: entries added to every checkpoint (a
        runtime's own); ``on_round(row)``: called after each saved round."""
        run, fabric = self.run, self.fabric
        previous = self.prepare(checkpoint, bad_images)
        start = checkpoint["round"] + 1 if checkpoint else 1
        with self.writing():
            logger = build_logger(run.log, self.out_dir, (checkpoint or {}).get("logger_run_id"),
                                  run_config(run), previous) if self.writer else None
        row: dict = previous[-1] if previous else {}  # a resumed complete run rewrites its summary from its last row
        selector = BestRoundSelector(run.eval.select, self.out_dir)
        silent = SilentRounds(run.federation.max_failed_rounds, previous)
        bar = tqdm(range(start, run.federation.rounds + 1), desc="rounds", disable=not (run.log.progress and self.writer),
                   interval=0)
        for round_idx in bar:
            tic = time.perf_counter()
            row = driver.run_round(round_idx)
            row["round_seconds"] = time.perf_counter() - tic
            problem = self.save_round(logger, driver, row, selector, extra) if self.writer else None
            if fabric.world_size > 1:
                problem = fabric.broadcast(problem, src=0)  # every rank stops together
            if problem:
                raise FedPromptError(problem)
            self.saved = round_idx
            silent.update(row, self.writer)
            _show_progress(bar, row)
            if on_round is not None:
                on_round(row)
        return self.finish(driver, row, selector, logger)

    def save_round(self, logger, driver, row: dict, selector: "BestRoundSelector", extra=None) -> str | None:
        """Rank 0 at the end of a round: the metrics row (file and logger), then ``checkpoints/last.ckpt`` (made
        after the logger logged: a W&B run id exists by then; ``extra()`` adds a runtime's entries), the best-round
        selection and the every-``log.checkpoint_every`` checkpoint. Returns ``None``, or the one-line problem of a
        failed write (a full disk: the last good checkpoint stays)."""
        try:
            append_jsonl(self.out_dir / "metrics.jsonl", row)  # whole or absent, whatever happens
            if logger is not None:
                logger.log_metrics(numeric_metrics(row), step=row["round"])
                if "client_acc" in row:
                    log_client_table(logger, row["round"], [c.name for c in driver.clients], row["client_acc"],
                                     [len(c.train) for c in driver.clients])
            save_logger(logger)
            state = {**checkpoint_state(driver, row["round"], self.run, logger_run_id(logger)),
                     **(extra() if extra else {})}
            save_checkpoint(state, self.out_dir / "checkpoints" / "last.ckpt")
        except OSError as err:
            return self.write_problem(err)
        self.saved = row["round"]
        try:
            selector.update(row, state)
            every = self.run.log.checkpoint_every
            if every and row["round"] % every == 0:
                save_checkpoint(state, self.out_dir / "checkpoints" / f"round-{row['round']:04d}.ckpt")
        except OSError as err:
            return self.write_problem(err)
        return None

    def finish(self, driver, row: dict, selector: "BestRoundSelector", logger) -> dict:
        """summary.json from the last row (and the selected round); the per-client table on the console."""
        rounds = self.run.federation.rounds
        summary = run_summary(driver, row, self.out_dir, rounds)
        summary.update(selector.summary())
        if self.writer:
            with self.writing():
                write_json(self.out_dir / "summary.json", summary)
                if logger is not None:
                    logger.finalize("success")
            print_clients(driver.clients, row.get("client_acc"), summary)
        self.fabric.barrier()
        return summary

    def evaluate(self, driver, checkpoint: dict | None, bad_images=()) -> dict:
        """``zeroshot`` and ``evaluate``: every client scored once; summary.json (zeroshot, with its config, row and
        left-out images) or eval.json (evaluate, beside the checkpoint's run)."""
        done = checkpoint["round"] if checkpoint else 0
        metrics = driver.evaluate(done)
        summary = run_summary(driver, {**metrics, "round": done}, self.out_dir, done)
        summary.pop("classnames")
        if self.mode == "evaluate":
            summary["checkpoint"] = str(self.run.resume)
        if self.writer:
            with self.writing():
                if self.mode != "evaluate":
                    self._write_start(bad_images)
                    write_jsonl(self.out_dir / "metrics.jsonl", [{"round": 0, **metrics}])
                else:
                    self._begin_writing()
                write_json(self.out_dir / ("eval.json" if self.mode == "evaluate" else "summary.json"), summary)
            print_clients(driver.clients, metrics.get("client_acc"), summary)
        self.fabric.barrier()
        return summary


def _show_progress(bar, row: dict) -> None:
    acc = row.get("local_acc", row.get("own_classes_acc", row.get("global_acc")))
    if acc is not None:
        bar.set_postfix(loss=row.get("train_loss"), acc=acc)


def checkpoint_state(driver, round_idx: int, run: RunArgs, run_id: str | None) -> dict:
    """What ``checkpoints/last.ckpt`` holds after ``round_idx``: the federation's state (the global and every
    client's prompt state the server holds, the rule's state, the method, its settings and shapes), the config, the
    sampler's position, the RNG and the logger's run id (so ``--resume`` continues the same W&B run)."""
    return {**driver.state(round_idx), "config": run_config(run),
            "sampler": {"seed": run.seed, "fraction": run.federation.fraction, "next_round": round_idx + 1},
            "rng": {"torch": torch.get_rng_state()}, "logger_run_id": run_id}


class BestRoundSelector:
    """Tracks the round with the best mean validation accuracy (``eval.select: val``)."""

    def __init__(self, rule: str, out_dir: Path):
        self.rule = rule
        self.out_dir = out_dir

    def update(self, row: dict, state: dict) -> None:
        if self.rule != "val" or row.get("val_acc") is None:
            return
        rows = [r for r in read_jsonl(self.out_dir / "metrics.jsonl") if r.get("val_acc") is not None]
        if max(rows, key=lambda r: r["val_acc"])["round"] == row["round"]:  # a new best (ties keep the first)
            save_checkpoint(state, self.out_dir / "checkpoints" / "best.ckpt")

    def summary(self) -> dict:
        if self.rule != "val":
            return {}
        rows = [r for r in read_jsonl(self.out_dir / "metrics.jsonl") if r.get("val_acc") is not None]
        if not rows:
            return {}
        best = max(rows, key=lambda r: r["val_acc"])  # the first round with the best validation accuracy
        keys = ("round", "val_acc", "local_acc", "local_acc_std", "own_classes_acc", "global_acc", "base_acc",
                "novel_acc", "hm", "cm", "unseen_acc")
        keys += tuple(scenario_keys(best)) + tuple(k for k in best if is_summary_key(k))
        return {"model_selection": "round with the best mean validation accuracy (checkpoints/best.ckpt)",
                "selected": {k: best[k] for k in keys if k in best}}


def run_summary(driver, row: dict, out_dir: Path, rounds: int) -> dict:
    """``summary.json`` of a run from its last metrics ``row``: the headline metrics, the clients and their
    sizes, the class names and the run directory."""
    keys = ("local_acc", "local_acc_std", "own_classes_acc", "own_classes_acc_std", "global_acc", "val_acc",
            "base_acc", "novel_acc", "hm", "cm", "unseen_acc", "set_acc", "client_acc",
            "client_base_acc", "client_novel_acc", "train_loss", "epsilon", "record_epsilon", "dp_noise_multiplier",
            "benign_acc", "attack_success_rate", "malicious_clients"
            ) + tuple(scenario_keys(row)) + tuple(k for k in row if is_summary_key(k))
    clients = driver.clients
    return {"method": driver.method.name, "rounds": rounds, "model_selection": "last round (no test-set selection)",
            **{k: row[k] for k in keys if k in row}, "clients": [c.name for c in clients],
            "num_train": [len(c.train) for c in clients], "num_test": [len(c.test) for c in clients],
            "classnames": driver.evaluator.classnames, "out_dir": str(out_dir)}


def print_clients(clients: list, client_acc: list[float] | None, summary: dict) -> None:
    """Each client's accuracy and the headline metrics, on the console."""
    if client_acc is None:
        extra = scenario_line(summary)
        if extra:
            print(f"{extra}   -> {summary['out_dir']}")
        return
    print(f"{'client':>6}  {'name':<16} {'train':>6} {'test':>6}  acc")
    for cid, (client, acc) in enumerate(zip(clients, client_acc)):
        acc_text = "n/a" if math.isnan(acc) else f"{acc:.4f}"
        print(f"{cid:>6}  {client.name:<16} {len(client.train):>6} {len(client.test):>6}  {acc_text}")
    local = "local_acc" if "local_acc" in summary else "own_classes_acc"
    line = f"{local} {summary[local]:.4f} +- {summary[local + '_std']:.4f}"
    if "global_acc" in summary:
        line += f"   global_acc {summary['global_acc']:.4f}"
    if "hm" in summary:
        line += (f"   base {summary['base_acc']:.4f} novel {summary['novel_acc']:.4f} hm {summary['hm']:.4f} "
                 f"cm {summary['cm']:.4f}")
    for key in ("target_acc", "ece"):
        if isinstance(summary.get(key), float):
            line += f"   {key} {summary[key]:.4f}"
    extra = scenario_line({k: v for k, v in summary.items() if k != "global_acc"})
    print(line + (f"   {extra}" if extra else "") + f"   -> {summary['out_dir']}")
