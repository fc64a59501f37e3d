"""The commands, as typed Python functions: what ``fedprompt <command>`` runs, and the API for scripts.

Every command takes the run settings (:class:`fedprompt.run.RunArgs`: a run config), either as one object or as
its fields in keywords, and some take their own options (:class:`~fedprompt.run.BenchArgs`,
:class:`~fedprompt.run.SweepArgs`, :class:`~fedprompt.run.PartitionArgs`; ``table`` takes only its options,
:class:`~fedprompt.run.TableArgs`)::

    from fedprompt.args import FederationArgs
    from fedprompt.run import RunArgs
    from fedprompt.commands import fit
    from fedprompt.data import Synthetic
    from fedprompt.methods import PromptFL

    summary = fit(method=PromptFL(n_ctx=4), data=Synthetic(), federation=FederationArgs(rounds=2))

This module is cheap to import: each command imports its implementation when it runs. A command's docstring is
its ``--help`` text (the first sentence is its summary in ``fedprompt --help``).
"""

from __future__ import annotations

from fedprompt.run import COMMAND_OPTIONS, BenchArgs, PartitionArgs, RunArgs, SweepArgs, TableArgs
from fedprompt.threats import AuditArgs


def fit(run: RunArgs | None = None, **settings) -> dict:
    """Train prompts across federated clients and write the run directory (metrics.jsonl, summary.json,
    checkpoints/last.ckpt).

    Args:
        run: the run's settings; or give them as keywords (``fit(method=..., data=..., federation=...)``).
    """
    from fedprompt.fit import setup

    return setup("fit", run or RunArgs(**settings))


def zeroshot(run: RunArgs | None = None, **settings) -> dict:
    """Evaluate zero-shot CLIP (or the given untrained method) on every client's test data; prints each client's
    accuracy and writes summary.json.

    Args:
        run: the run's settings (or its fields as keywords).
    """
    from fedprompt.fit import setup

    return setup("zeroshot", run or RunArgs(**settings))


def evaluate(run: RunArgs | None = None, **settings) -> dict:
    """Evaluate every client of a checkpoint (--resume DIR/checkpoints/last.ckpt) on its own test data; writes
    eval.json in out_dir.

    Args:
        run: the run's settings (or its fields as keywords).
    """
    from fedprompt.fit import setup

    return setup("evaluate", run or RunArgs(**settings))


def sweep(run: RunArgs | None = None, options: SweepArgs | None = None, **settings) -> dict:
    """Run a fit config once per seed (OUT/seed1, OUT/seed2, ...) and write the mean +- std over seeds of the final
    metrics (OUT/seeds.md, OUT/seeds.json). Rerunning the command continues: finished seeds are kept.

    The run settings are those of fit, except: out_dir is the sweep folder (default runs/<method>-seeds), seed is
    replaced by each of the seeds, resume is not taken (rerun the same sweep command to continue it), overwrite
    deletes the runs of a previous sweep in out_dir, and with eval.select val each seed contributes its selected
    round.

    Args:
        run: the run's settings (or its fields as keywords).
        options: the seeds.
    """
    from fedprompt.sweep import run_sweep

    return run_sweep(run or RunArgs(**settings), options or SweepArgs())


def partition(run: RunArgs | None = None, options: PartitionArgs | None = None, **settings) -> None:
    """Print the class x client table of train samples of a config's federated split (no model is loaded).

    When clients have their own class lists (data: Combined, partition: CrossClass) it prints one line per client
    instead (dataset, number of classes, train/test samples, its first class names) and the evaluation sets (name,
    classes, test samples; unseen for datasets never trained on). Only data is read from the config (a full run
    config can be given; data.seed seeds the split).

    Args:
        run: the run's settings (or its fields as keywords).
        options: table or JSON.
    """
    from fedprompt.partition_table import print_partition

    return print_partition(run or RunArgs(**settings), options or PartitionArgs())


def bench(run: RunArgs | None = None, options: BenchArgs | None = None, **settings) -> dict:
    """Time a few rounds of a configured federation (--config CONFIG, as for fit), or with --truncation true the
    prompt text path with and without end-of-text truncation.

    The round benchmark prints, per round, seconds split into data, image tower, text encoder, logits (FedOTP:
    similarity and OT), backward, optimizer, evaluation and communication, train images per second, peak memory,
    GPU utilisation and K; then (profile) the aten ops and host syncs of one warm local round, per step and per
    client-step. Nothing is logged or checkpointed (log, out_dir and resume are ignored).

    Args:
        run: the run's settings (as for fit; federation.rounds is replaced by options.rounds), or its fields as
            keywords.
        options: the benchmark's own options.
    """
    from fedprompt.bench import run_bench

    return run_bench(run or RunArgs(**settings), options or BenchArgs())


def table(options: TableArgs | None = None, **settings) -> dict:
    """Write the paper table of finished runs (fedprompt table RUN_DIR ...): rows methods, columns datasets,
    metrics or target datasets, mean +- std over seeds, best per column marked; as Markdown, CSV and a PNG figure.

    Each RUN_DIR is a fit run or a sweep folder (its seeds). Runs of one dataset must share one protocol (data split,
    evaluation, backbone): mixed protocols in a column are refused.

    Args:
        options: the run directories and the table's layout (or their fields as keywords).
    """
    from fedprompt.table import make_table

    return make_table(options or TableArgs(**settings))


def audit(run: RunArgs | None = None, options: AuditArgs | None = None, **settings) -> dict:
    """Measure what a finished run's prompts leak about their training images (fedprompt audit RUN_DIR): the
    loss-threshold and likelihood-ratio (LiRA) membership-inference attacks, with shadow federations trained by the
    run's method on its protocol; AUC and TPR at 1 % and 0.1 % FPR, overall and per client, written to
    RUN_DIR/audit/.

    The run settings are read from RUN_DIR/hyperparameters.yaml (flags override them, e.g. --data.root where the
    images moved); the run's own files are never changed (--overwrite true replaces an earlier audit). Members are
    each client's train images, non-members as many of its test images; see docs/audit.md.

    Args:
        run: the run's settings (default: read from the run directory's hyperparameters.yaml), or its fields as
            keywords.
        options: the run directory and the audit's options.
    """
    from fedprompt.audit import run_audit, run_settings

    options = options or AuditArgs()
    if run is None:
        run = RunArgs(**settings) if settings else run_settings(options.run_dir[0])
    return run_audit(run, options)


#: subcommand -> (function, its options class or None); an options class with ``takes_run = False`` gets no run
#: settings (the function takes the options alone), and its ``positional`` fields are positional arguments
COMMANDS = {name: (function, COMMAND_OPTIONS[name]) for name, function in (
    ("fit", fit), ("evaluate", evaluate), ("zeroshot", zeroshot), ("sweep", sweep), ("partition", partition),
    ("bench", bench), ("table", table), ("audit", audit))}
