"""``fedprompt fit | zeroshot | evaluate``: check the settings, build Fabric, launch, and run the rounds.

The commands themselves (:func:`fedprompt.commands.fit`, ``zeroshot``, ``evaluate``, typed on
:class:`fedprompt.run.RunArgs`) call :func:`setup`: it checks the arguments and the checkpoint (nothing loads before
that), builds Fabric and launches one process per device, and runs :func:`main` on every rank: the run folder is
claimed (:class:`fedprompt.run_folder.RunFolder`), the data, the backbone and the roles of the federation are built
(:func:`fedprompt.build.build_parts`), the checkpoint restored, and the rounds run by the round driver
(:class:`fedprompt.federation.round.RoundDriver`) over the in-process Fabric transport, each saved by the run folder.
Everything that can be checked without loading data or a model is checked first.
"""

from __future__ import annotations

from fedprompt.build import (build_parts, check_round_order, on_one_device, one_client_per_step,
                             read_data_and_check_weights)
from fedprompt.errors import FedPromptError
from fedprompt.run import RunArgs
from fedprompt.run_folder import Interrupted, RunFolder, completed_run, open_run

__all__ = ["Interrupted", "check_accelerator", "main", "setup"]


def setup(mode: str, run: RunArgs) -> dict:
    """Check the arguments and the checkpoint, build Fabric and run :func:`main` on every process (``mode``: fit,
    zeroshot or evaluate)."""
    run = _check_arguments(mode, run)
    run, checkpoint = open_run(mode, run)
    if mode == "fit":
        complete = completed_run(run, checkpoint)
        if complete is not None:
            return complete
    if run.runtime == "flower":
        return _run_flower(mode, run)
    fabric = _build_fabric(run)
    fabric.launch()
    return main(fabric, mode, run, checkpoint)


def _build_fabric(run: RunArgs):
    """Lightning Fabric from the ``fabric`` settings; settings Lightning refuses are one line naming them."""
    import lightning as L  # here, not at import time: the CLI builds its parser without it

    fab = run.fabric
    try:
        return L.Fabric(accelerator=fab.accelerator, devices=fab.devices, num_nodes=fab.num_nodes,
                        strategy=fab.strategy, precision=fab.precision)
    except Exception as err:  # noqa: BLE001 - Lightning raises ValueError, RuntimeError, MisconfigurationException
        reason = " ".join(str(err).split()) or type(err).__name__
        raise FedPromptError(f"fabric: Lightning cannot run with accelerator {fab.accelerator}, devices "
                             f"{fab.devices}, num_nodes {fab.num_nodes}, strategy {fab.strategy}, precision "
                             f"{fab.precision} ({reason[:300]}); change the --fabric settings.") from None


def _check_arguments(mode: str, run: RunArgs) -> RunArgs:
    """Checks that need no data and no model (the ranges of numbers and the names Lightning knows are checked by
    the argument dataclasses): the settings fit together, the accelerator asked for exists on this machine, the
    logger's package is installed. Returns the run (zeroshot's method filled in)."""
    from dataclasses import replace

    from fedprompt.loggers import check_logger

    if mode == "zeroshot" and run.method is None:
        from fedprompt.methods import ZeroShot

        run = replace(run, method=ZeroShot())
    if run.method is None:
        raise FedPromptError("method is not set: give a config with method.class_path (e.g. "
                             "fedprompt.methods.PromptFL) or --method PromptFL.")
    if run.data is None:
        raise FedPromptError("data is not set: give a config with data.class_path (e.g. fedprompt.data.DomainFolders).")
    if run.eval.select == "val" and not run.data.validation:
        raise FedPromptError("eval.select=val needs a validation set: set data.validation: true.")
    if mode == "evaluate" and not run.resume:
        raise FedPromptError("evaluate needs --resume DIR/checkpoints/last.ckpt (the checkpoint to evaluate).")
    if run.resume and run.overwrite:
        raise FedPromptError("--overwrite true deletes the run that --resume continues: pass only one of them.")
    if mode == "zeroshot" and run.resume:
        raise FedPromptError("zeroshot takes no --resume (it trains nothing); use fedprompt evaluate --resume.")
    check_accelerator(run.fabric.accelerator)
    if mode != "evaluate":
        check_logger(run.log)
    if run.runtime == "flower":
        check_flower_runtime(run)
    if mode == "fit":
        check_round_order(run, run.runtime)
    return run


def check_flower_runtime(run: RunArgs) -> None:
    """``--runtime flower`` runs one process on one device, each client alone on its node (K = 1), and needs
    Flower; one line for a setting it cannot honour."""
    from fedprompt.flower import require_flower

    fab, parallel = run.fabric, run.federation.parallel_clients
    if not on_one_device(run):
        raise FedPromptError(f"--runtime flower runs in one process on one device (each client on its own node); "
                             f"it cannot use --fabric.devices {fab.devices} --fabric.num_nodes {fab.num_nodes}: pass "
                             "--fabric.devices 1 --fabric.num_nodes 1, or --runtime fabric.")
    if not one_client_per_step(run):
        raise FedPromptError(f"--federation.parallel_clients {parallel}: under --runtime flower each client trains "
                             "alone on its node (K = 1); pass --federation.parallel_clients 1 (or auto), or "
                             "--runtime fabric.")
    require_flower()


def _run_flower(mode: str, run: RunArgs) -> dict:
    """The command as a Flower app in this process (:func:`fedprompt.flower.grid.run_flower`)."""
    from fedprompt.flower.grid import run_flower

    return run_flower(mode, run)


def check_accelerator(name: str) -> None:
    """The accelerator asked for is present on this machine (Lightning's own availability test); one line if not."""
    from lightning.fabric.accelerators import ACCELERATOR_REGISTRY, CUDAAccelerator, MPSAccelerator

    if name == "auto":
        return
    if name == "gpu":
        if not (CUDAAccelerator.is_available() or MPSAccelerator.is_available()):
            raise FedPromptError("--fabric.accelerator gpu: this machine has no GPU Lightning can use (neither CUDA "
                                 "nor MPS); pass --fabric.accelerator cpu (or auto).")
        return
    if name in ACCELERATOR_REGISTRY and not ACCELERATOR_REGISTRY.get(name).is_available():
        what = {"cuda": "CUDA device (torch.cuda.is_available() is false)", "mps": "Apple MPS device"}
        raise FedPromptError(f"--fabric.accelerator {name}: this machine has no {what.get(name, name + ' device')}; "
                             "pass --fabric.accelerator cpu (or auto, which takes what there is).")


def main(fabric, mode: str, run: RunArgs, checkpoint: dict | None = None) -> dict:
    """Run one command on this rank; returns the summary (on every rank). Check everything, then touch anything:
    the data, the weights, the backbone, the federation and the checkpoint's fit are all checked before the first
    file of the run directory is written (or, with ``--overwrite``, deleted)."""
    folder = RunFolder(fabric, mode, run)
    with folder.claimed():
        splits = read_data_and_check_weights(run)
        parts = build_parts(fabric, run, splits)
        driver = parts.fabric_driver(run.federation.rounds, progress=run.log.progress and folder.writer)
        if checkpoint is not None:
            driver.restore(checkpoint, run.resume)  # checks the prompt shapes and the clients first; memory only
        if mode != "fit" or not parts.method.trains:  # zeroshot never trains, whatever the method
            return folder.evaluate(driver, checkpoint, splits.bad_images)
        return folder.train(driver, checkpoint, splits.bad_images)
