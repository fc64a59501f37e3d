"""Experiment loggers: CSV (default), Weights & Biases, TensorBoard, through Lightning's logger classes.

``metrics.jsonl`` in the run directory is written independently of the logger (the run-directory contract). Every
logger holds every round after any interrupt and resume: :func:`save_logger` flushes it after each round (the CSV
file and TensorBoard's event file are on disk once a round's checkpoint is), and on resume the CSV file is rebuilt
from ``metrics.jsonl`` (the rounds up to the checkpoint) before the run continues.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fedprompt.args import LogArgs
from fedprompt.errors import FedPromptError

#: the packages each optional logger needs (any one of them) and the fedprompt extra that installs them
LOGGER_PACKAGES = {"wandb": (("wandb",), "wandb"), "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard")}


def check_logger(args: LogArgs) -> None:
    """The package of the chosen logger is installed; otherwise one line naming the extra that installs it
    (checked before the run directory is touched)."""
    if args.logger not in LOGGER_PACKAGES:
        return
    packages, extra = LOGGER_PACKAGES[args.logger]
    if not any(importlib.util.find_spec(name) is not None for name in packages):
        raise FedPromptError(f"log.logger={args.logger} needs the {packages[0]} package, which is not installed: "
                             f"pip install 'fedprompt[{extra}]' (or pass --log.logger csv).")


def build_logger(args: LogArgs, out_dir: Path, run_id: str | None = None, config: dict | None = None,
                 previous_rows: list[dict] | None = None):
    """A Lightning logger for Fabric (``None`` for ``logger: none``).

    Args:
        args: the ``log`` settings.
        out_dir: the run directory.
        run_id: the W&B run id of a resumed run (continues the same W&B run).
        config: the resolved config (sent to W&B).
        previous_rows: on resume, the ``metrics.jsonl`` rows up to the checkpoint: the CSV file is rebuilt from them
            (W&B and TensorBoard already hold them).
    """
    name = args.run_name or out_dir.name
    if args.logger == "none":
        return None
    if args.logger == "csv":
        from lightning.fabric.loggers import CSVLogger

        csv_file = out_dir / "csv" / "metrics.csv"
        if csv_file.is_file():  # rebuilt below from metrics.jsonl (it may hold rounds after the checkpoint)
            csv_file.unlink()
        logger = CSVLogger(root_dir=str(out_dir), name="csv", version="", flush_logs_every_n_steps=1)
        for row in previous_rows or []:
            logger.log_metrics(numeric_metrics(row), step=row["round"])
        return logger
    check_logger(args)
    if args.logger == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(root_dir=str(out_dir), name="tensorboard", version="")
    from lightning.pytorch.loggers import WandbLogger
    mode = os.environ.get("WANDB_MODE", args.wandb_mode)
    return WandbLogger(project=args.project, name=name, save_dir=str(out_dir), id=run_id, resume="allow",
                       mode=mode, config=config)


def save_logger(logger) -> None:
    """Write what the logger holds to disk (called after every round, so an interrupt loses no round)."""
    if logger is not None:
        logger.save()


def logger_run_id(logger) -> str | None:
    """The W&B run id (to resume the same run), else ``None``."""
    if logger is None or type(logger).__name__ != "WandbLogger":
        return None
    return str(logger.version)


def numeric_metrics(row: dict) -> dict[str, float]:
    """The scalar entries of a metrics row (what goes to the logger)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "round"}


def log_client_table(logger, round_idx: int, names: list[str], client_acc: list[float],
                     num_train: list[int]) -> None:
    """A per-client table (W&B only; CSV keeps per-client accuracies in metrics.jsonl)."""
    if logger is None or type(logger).__name__ != "WandbLogger":
        return
    import wandb

    table = wandb.Table(columns=["round", "client", "name", "num_train", "acc"],
                        data=[[round_idx, i, n, t, a] for i, (n, a, t) in enumerate(zip(names, client_acc, num_train))])
    logger.experiment.log({"clients": table}, commit=False)
