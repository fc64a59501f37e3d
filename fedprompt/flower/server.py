"""The fedprompt ServerApp: a thin adapter that runs fedprompt's round driver over Flower messages.

The server builds the roles of the federation without any images (:func:`fedprompt.build.build_parts`: the
sampler, the server's rule, the evaluator's summaries), hands the round driver
(:class:`fedprompt.federation.round.RoundDriver`) the Flower transport (:class:`fedprompt.flower.transport.
FlowerTransport`) and lets the run-folder driver (:class:`fedprompt.run_folder.RunFolder`) run and save the rounds,
exactly as ``fedprompt fit`` does with its Fabric transport: hyperparameters.yaml, metrics.jsonl (the rows of
``fedprompt fit``, with ``failed_clients`` for clients whose node failed or did not answer), summary.json,
checkpoints/last.ckpt (and best/round checkpoints), the config's logger. ``--resume DIR/checkpoints/last.ckpt`` in the
app's ``args`` continues a run: the server restores the round, the global state and the rule; each client continues
from its own state of that round (kept on its node, or, with ``report-states``, sent back from the checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import replace

from fedprompt.flower import require_flower

require_flower()  # one clear line without the flower extra

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprompt.build import build_parts, check_round_order, read_data_and_check_weights
from fedprompt.errors import FedPromptError
from fedprompt.flower.node import one_at_a_time, run_key, single_fabric
from fedprompt.flower.options import AppOptions
from fedprompt.flower.transport import FlowerTransport, say
from fedprompt.run import run_config
from fedprompt.run_folder import RunFolder, completed_run, open_run


class FlowerServer:
    """The ServerApp's work for one run.

    Args:
        run: the run's settings.
        options: the app's settings.
        mode: ``fit`` (the rounds), or ``evaluate`` / ``zeroshot`` (every client scored once).
        announce: one line per round on the console (a deployed server has no progress bar).
        splits: the run's data, if it was read already.
    """

    def __init__(self, run, options: AppOptions, mode: str = "fit", announce: bool = True, splits=None):
        self.options = options
        self.splits = splits
        self.mode = mode
        self.announce = announce
        if mode == "fit":
            check_round_order(run, "flower")
        single = one_at_a_time(run)
        if not announce:  # in a fedprompt command: its rounds bar, as the command line asked
            single = replace(single, log=replace(single.log, progress=run.log.progress))
        self.run, self.checkpoint = open_run(mode, single)
        self.fabric = single_fabric(self.run, accelerator="cpu")  # the server only merges and writes

    def start(self, grid: Grid) -> dict:
        """Run the rounds (``federation.rounds``; a resumed run from its next round) and write the run directory;
        returns the summary."""
        complete = completed_run(self.run, self.checkpoint) if self.mode == "fit" else None
        if complete is not None:
            return complete
        folder = RunFolder(self.fabric, self.mode, self.run)
        with folder.claimed():  # one writer per run folder, as fedprompt fit
            return self._run(grid, folder)

    def _run(self, grid: Grid, folder: RunFolder) -> dict:
        run, checkpoint = self.run, self.checkpoint
        splits = self.splits or read_data_and_check_weights(run)
        parts = build_parts(self.fabric, run, splits, feed_clients=[])
        if self.options.secure_aggregation:
            from fedprompt.flower.secure import check_secure

            check_secure(parts)
        saved = (checkpoint or {}).get("flower", {}).get("run_key")  # a resumed run keeps its identity
        key = saved or run_key({**run_config(run), "started": time.time()}, str(folder.out_dir))
        transport = FlowerTransport(grid, self.options, parts, key)
        driver = parts.driver(transport, run.federation.rounds)
        if checkpoint is not None:
            driver.restore(checkpoint, run.resume)
        if self.mode != "fit" or not parts.method.trains:
            return folder.evaluate(driver, checkpoint, splits.bad_images)
        if self.announce:
            say(f"{parts.method.name} over {len(parts.clients)} clients, {run.federation.rounds} rounds, run "
                f"directory {folder.out_dir}" + (" (SecAgg+)" if self.options.secure_aggregation else ""))
        return folder.train(driver, checkpoint, splits.bad_images, extra=transport.checkpoint_extra,
                            on_round=self._announce if self.announce else None)

    @staticmethod
    def _announce(row: dict) -> None:
        acc = row.get("local_acc", row.get("own_classes_acc", row.get("global_acc")))
        say(f"round {row['round']}: train_loss {row.get('train_loss')}" + (f", acc {acc}" if acc is not None else ""))


def make_server_app(settings: dict | None = None, run=None, mode: str = "fit", load_run=None,
                    announce: bool = True) -> ServerApp:
    """A fedprompt :class:`~flwr.serverapp.ServerApp`: for one run's settings ``run`` (in this process), or reading
    the run config's fedprompt config file with ``load_run`` (:func:`fedprompt.flower.config.run_args`; ``settings``
    fill in run-config keys, for Flower's in-process simulation API, which has no run config of its own)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            options = AppOptions.from_config(context.run_config, settings)
            FlowerServer(run if run is not None else load_run(options.config, options.args), options, mode,
                         announce).start(grid)
        except FedPromptError as err:
            say(f"error: {err}")
            raise

    return app
