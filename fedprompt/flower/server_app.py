"""The fedprompt ServerApp: a Flower :class:`~flwr.serverapp.strategy.Strategy` around the method's own fedprompt
:class:`~fedprompt.federation.aggregators.Aggregator`.

Each round, as :meth:`fedprompt.federation.loop.Federation.run_round` does in one process:

1. the clients of the round come from fedprompt's seeded sampler (:meth:`Federation.sampled`,
   :func:`fedprompt.federation.sampling.sample_clients`), and each one's node from the ``query`` replies (a node
   tells its partition id and its config's fingerprint; a node whose config differs is left out with one line);
2. ``train`` messages carry each client's ``download`` of the global state and the aggregator's state; the replies
   carry the uploads, which the aggregator merges (``aggregate``, or ``partial_sum``/``finish`` for ``reduce``
   aggregators such as FedTPG's: the same float path as ``fedprompt fit``), or Flower's SecAgg+ sums them;
3. ``evaluate`` messages carry the new global state to every client (each merges it with ``apply`` on its node) and,
   in evaluated rounds, bring back each client's accuracies, summarised by
   :meth:`Federation.summarize_evaluation`.

The run directory is fedprompt's (the pieces of :mod:`fedprompt.fit`): hyperparameters.yaml, metrics.jsonl (the
rows of ``fedprompt fit``, with ``failed_clients`` for clients whose node failed or did not answer), summary.json,
checkpoints/last.ckpt (and best/round checkpoints), the config's logger. ``--resume DIR/checkpoints/last.ckpt`` in the
app's ``args`` continues a run: the server restores the round, the global state and the aggregator; each client
continues from its own state of that round (kept on its node, or, with ``report-states``, sent back by the server
from the checkpoint).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable

import torch
from fedprompt.flower import require_flower

require_flower()  # one clear line without the flower extra

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from fedprompt import fit as fedfit
from fedprompt import rundir
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import state_bytes
from fedprompt.federation.checkpoint import check_resume, check_shapes, load_checkpoint, state_shapes, write_json
from fedprompt.flower.options import AppOptions
from fedprompt.flower.runtime import differences, evaluation_from_flat, fingerprint, one_at_a_time, run_args, \
    run_key, single_fabric, to_bytes
from fedprompt.loggers import build_logger, logger_run_id

State = dict[str, torch.Tensor]


def _say(message: str) -> None:
    print(f"fedprompt: {message}", file=sys.stderr, flush=True)


def _arrays(state: State) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


class FedPromptStrategy(Strategy):
    """A Flower strategy that runs a fedprompt config: the method's aggregator on the server, the method's clients
    on the nodes, fedprompt's sampler, metrics and run directory.

    Args:
        run: the run settings (:func:`fedprompt.flower.runtime.run_args`).
        options: the app's settings.
    """

    def __init__(self, run, options: AppOptions):
        self.options = options
        self.run = one_at_a_time(run)
        self.checkpoint = load_checkpoint(run.resume) if run.resume else None
        if self.checkpoint is not None:
            check_resume(self.checkpoint, run.resume, run.method.name, run.method.hparams())
            if run.out_dir is None and rundir.run_dir_of(run.resume) is not None:
                self.run.out_dir = str(rundir.run_dir_of(run.resume))
        self.fabric = single_fabric(self.run, accelerator="cpu")  # the server only merges and writes
        self.splits = fedfit.read_data_and_check_weights(self.run)
        self.fed, self.classnames = fedfit.build_federation(self.fabric, self.run, self.splits, feed_clients=[])
        self.reference = fingerprint(self.fed)
        self.out_dir = fedfit.resolve_out_dir(self.fabric, self.run)
        saved = (self.checkpoint or {}).get("flower", {}).get("run_key")  # a resumed run keeps its identity
        self.key = saved or run_key({**fedfit.run_config(self.run), "started": time.time()}, str(self.out_dir))
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.left_out: dict[int, str] = {}  # node id -> why it is not used
        self.counted: set[int] = set()  # the clients whose training the last aggregation used
        self.restore: dict[int, State] = {}  # client states to send back (a resumed run with report-states)
        self._pending: dict = {}
        if options.secure_aggregation:
            from fedprompt.flower.secure import check_secure

            check_secure(self.fed)

    # ------------------------------------------------------------------------------------------- nodes
    def discover(self, grid: Grid) -> None:
        """Ask the nodes not seen yet which client they hold and check their config against the server's; a node
        without a usable client is left out with one line."""
        alive = set(grid.get_node_ids())
        self.nodes = {cid: nid for cid, nid in self.nodes.items() if nid in alive}  # a restarted node comes back new
        known = set(self.nodes.values()) | set(self.left_out)
        new = [nid for nid in sorted(alive) if nid not in known]
        if not new:
            return
        messages = [Message(RecordDict({"fedprompt": ConfigRecord({"run_key": self.key})}), dst_node_id=nid,
                            message_type="query", group_id="discover") for nid in new]
        replies = self._send(grid, messages)
        for nid in new:
            reply = replies.get(nid)
            if reply is None:
                continue  # asked again next round
            why = self._node_problem(nid, reply)
            if why is not None:
                self.left_out[nid] = why
                if not reply.has_error():  # the node printed its own error line; this one the server found
                    _say(f"node {nid} is left out: {why}")
                continue
            cid = int(reply.content.config_records["fedprompt"]["cid"])
            self.nodes[cid] = nid

    def _node_problem(self, nid: int, reply: Message) -> str | None:
        if reply.has_error():
            return reply.error.reason or "its ClientApp failed"
        info = reply.content.config_records["fedprompt"]
        cid = int(info["cid"])
        node_fp = json.loads(str(info["fingerprint"]))
        diff = differences(self.reference, node_fp)
        if diff:
            return (f"its config differs from the server's in {'; '.join(diff)} (client {cid}); start it with the "
                    "run's config")
        if cid in self.nodes and self.nodes[cid] != nid:
            return f"client {cid} is already held by node {self.nodes[cid]}"
        return None

    # ------------------------------------------------------------------------------------------- messages
    def _content(self, cid: int, version: int, extra: dict) -> RecordDict:
        fed = self.fed
        received = fed.aggregator.download(fed.global_state, cid) if fed.global_state else {}
        cfg = {"cid": cid, "version": version, "run_key": self.key,
               "aggregator": to_bytes(fed.aggregator.state_dict()), **extra}
        content = RecordDict({"fedprompt": ConfigRecord(cfg), "download": _arrays(received)})
        if cid in self.restore:
            content["restore"] = _arrays(self.restore[cid])
        return content

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One ``train`` message per sampled client that has a node (the others are failed clients of the round)."""
        sampled = self.fed.sampled(server_round)
        self._pending = {"sampled": sampled, "failed": {}}
        messages = []
        for cid in sampled:
            if cid not in self.nodes:
                self._pending["failed"][cid] = "no node holds this client"
                continue
            extra = {"counted": cid in self.counted, "round": server_round}
            messages.append(Message(self._content(cid, server_round - 1, extra), dst_node_id=self.nodes[cid],
                                    message_type="train", group_id=str(server_round)))
        return messages

    def _send(self, grid: Grid, messages: list[Message]) -> dict[int, Message]:
        """Send and wait for the replies (``timeout`` of the run config); returns them by destination node (an
        error reply of the SuperLink, e.g. "node unavailable" when a node stopped sending heartbeats, included)."""
        if not messages:
            return {}
        replies = list(grid.send_and_receive(messages, timeout=self.options.timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return {sent.get(r.metadata.reply_to_message_id or None, r.metadata.src_node_id): r for r in replies}

    def _client_of(self, node: int) -> int | None:
        return next((c for c, n in self.nodes.items() if n == node), None)

    def aggregate_train(self, server_round: int,
                        replies: dict[int, Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the uploads (the replies by node) with the method's aggregator, as the single-process loop does
        (client-id order)."""
        fed, pending = self.fed, self._pending
        failed, trained, uploads = pending["failed"], {}, {}
        for node, reply in replies.items():
            cid = self._client_of(node)
            if cid is None:
                continue
            if reply.has_error():
                failed[cid] = f"node {node} failed: {reply.error.reason}"
                continue
            info = reply.content.config_records["fedprompt"]
            if info["failure"]:
                trained[cid] = (math.nan, str(info["failure"]))
                continue
            trained[cid] = (float(reply.content.metric_records["metrics"]["loss"]), None)
            uploads[cid] = reply.content.array_records["upload"].to_torch_state_dict()
        for cid in pending["sampled"]:
            if cid not in failed and cid not in trained:
                failed[cid] = f"no reply within {self.options.timeout:g} s"
        training_failed = {cid: why for cid, (_, why) in sorted(trained.items()) if why}
        fed._check_failures(training_failed, server_round)  # on_client_failure: raise stops here, skip goes on
        failed.update(training_failed)
        ok = sorted(cid for cid in trained if cid not in failed)
        return self._merge(server_round, {cid: uploads[cid] for cid in ok}, [trained[c][0] for c in ok], failed)

    def _merge(self, server_round: int, uploads: dict[int, State], losses: list[float], failed: dict,
               merged: State | None = None):
        fed = self.fed
        ok = sorted(uploads)
        if fed.method.communicates and ok:
            weights = {cid: len(fed.clients[cid].train) for cid in ok}
            if merged is not None:  # secure aggregation: the server only has the mean
                fed.global_state = merged
            elif fed.aggregator.reduce:
                fed.global_state = fed.aggregator.finish(fed.aggregator.partial_sum(uploads, weights,
                                                                                    fed.global_state),
                                                         fed.global_state)
            else:
                fed.global_state = fed.aggregator.aggregate(uploads, weights, server_round)
        self.counted = set(ok)
        losses = [x for x in losses if not math.isnan(x)]
        self._pending.update(ok=ok, failed=failed, losses=losses,
                             bytes_up=sum(state_bytes(uploads[c]) for c in ok))
        metrics = MetricRecord({"train_loss": sum(losses) / len(losses)}) if losses else None
        return (_arrays(fed.global_state) if fed.global_state else None), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every client with a node gets the new global state (and, in evaluated rounds, scores itself)."""
        evaluate = bool(config.get("evaluate", True))
        messages = []
        for cid in range(len(self.fed.clients)):
            if cid not in self.nodes:
                continue
            extra = {"counted": cid in self.counted, "evaluate": evaluate,
                     "report_state": self.options.report_states}
            messages.append(Message(self._content(cid, server_round, extra), dst_node_id=self.nodes[cid],
                                    message_type="evaluate", group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: dict[int, Message]) -> MetricRecord | None:
        """Collect every client's accuracies (the replies by node; a client without a reply: NaN)."""
        results: dict = {}
        self._pending["evaluated"] = evaluated = {}
        for node, reply in replies.items():
            cid = self._client_of(node)
            if cid is None or reply.has_error():
                continue
            self.restore.pop(cid, None)
            if "metrics" in reply.content.metric_records:
                results.update(evaluation_from_flat(cid, dict(reply.content.metric_records["metrics"])))
            if "state" in reply.content.array_records:
                self.fed.states[cid] = reply.content.array_records["state"].to_torch_state_dict()
            evaluated[cid] = True
        self._pending["results"] = results
        return None

    def summary(self) -> None:
        _say(f"{self.fed.method.name} over {len(self.fed.clients)} clients, {self.run.federation.rounds} rounds, "
             f"run directory {self.out_dir}" + (" (SecAgg+)" if self.options.secure_aggregation else ""))

    # ------------------------------------------------------------------------------------------- the run
    def _resume(self) -> int:
        """Restore a checkpoint (round, global state, aggregator, reported client states); the first round to run."""
        if self.checkpoint is None:
            return 1
        checkpoint, fed = self.checkpoint, self.fed
        check_shapes(checkpoint, self.run.resume, state_shapes(fed.states[min(fed.states)]))
        clients = checkpoint["clients"]
        if clients and len(clients) != len(fed.clients):
            raise FedPromptError(f"--resume: the checkpoint has {len(clients)} clients but this config makes "
                                 f"{len(fed.clients)}; resume with the config of the run (its hyperparameters.yaml).")
        fed.global_state = checkpoint["global"]
        fed.aggregator.load_state_dict(checkpoint.get("aggregator", {}))
        if clients:
            fed.states = {int(cid): state for cid, state in clients.items()}
            self.restore = dict(fed.states)
        self.counted = set()
        return checkpoint["round"] + 1

    def _checkpoint_state(self, round_idx: int, logger) -> dict:
        state = fedfit.checkpoint_state(self.fed, round_idx, self.run, logger_run_id(logger))
        if not self.options.report_states:
            state["clients"] = {}  # the clients' own states stay on their nodes
        state["flower"] = {"run_key": self.key,
                           "client_states": "checkpoint" if self.options.report_states else "nodes",
                           "secure_aggregation": self.options.secure_aggregation}
        return state

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Run the fedprompt rounds (``federation.rounds``; a resumed run from its next round) and write the run
        directory; returns Flower's :class:`~flwr.serverapp.strategy.Result` (the last global state and the rows)."""
        run, fabric = self.run, self.fabric
        rounds = num_rounds or run.federation.rounds
        result = Result()
        if self.checkpoint is not None and self.checkpoint["round"] >= rounds and \
                (self.out_dir / "summary.json").is_file():
            _say(f"the run in {self.out_dir} is complete (round {self.checkpoint['round']}); nothing changed.")
            return result
        with fedfit.claimed_run_dir(fabric, "fit", run, self.out_dir):  # one writer per run folder, as fedprompt fit
            return self._run_rounds(grid, rounds, result)

    def _run_rounds(self, grid: Grid, rounds: int, result: Result) -> Result:
        """The rounds of :meth:`start`, with the run folder held: checked, then written."""
        run, fed, fabric = self.run, self.fed, self.fabric
        previous = fedfit.prepare_run_dir(fabric, self.out_dir, "fit", run, self.checkpoint, self.splits.bad_images)
        start = self._resume()
        logger = build_logger(run.log, self.out_dir, self.checkpoint.get("logger_run_id") if self.checkpoint else None,
                              fedfit.run_config(run), previous)
        selector = fedfit.BestRoundSelector(run.eval.select, self.out_dir)
        self.summary()
        row: dict = previous[-1] if previous else {}
        saved = start - 1  # the round checkpoints/last.ckpt holds
        for round_idx in range(start, rounds + 1):
            tic = time.perf_counter()
            self.discover(grid)
            row = self._train_round(grid, round_idx)
            evaluate = round_idx % run.eval.every == 0 or round_idx == rounds
            replies = self._send(grid, list(
                self.configure_evaluate(round_idx, ArrayRecord(), ConfigRecord({"evaluate": evaluate}), grid)))
            self.aggregate_evaluate(round_idx, replies)
            if evaluate:
                row.update(fed.summarize_evaluation(self._pending["results"]))
            row["round_seconds"] = time.perf_counter() - tic
            problem = fedfit.save_round(self.out_dir, logger, fed, row, run, selector, saved,
                                        lambda: self._checkpoint_state(round_idx, logger))
            if problem:
                raise FedPromptError(problem)
            saved = round_idx
            if fed.global_state:
                result.arrays = _arrays(fed.global_state)
            result.train_metrics_clientapp[round_idx] = MetricRecord(
                {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and v is not None})
            _say(f"round {round_idx}: train_loss {row.get('train_loss')}, "
                 f"acc {row.get('local_acc', row.get('own_classes_acc'))}")
        summary = fedfit.run_summary(fed, self.classnames, row, self.out_dir, rounds)
        summary.update(selector.summary())
        write_json(self.out_dir / "summary.json", summary)
        if logger is not None:
            logger.finalize("success")
        return result

    def _train_round(self, grid: Grid, round_idx: int) -> dict:
        """One round's training and aggregation; the metrics row as :meth:`Federation.run_round` makes it."""
        start = time.perf_counter()
        fed = self.fed
        sampled = fed.sampled(round_idx)
        bytes_down = sum(state_bytes(fed.aggregator.download(fed.global_state, cid)) for cid in sampled) \
            if fed.global_state else 0
        if self.options.secure_aggregation and fed.method.communicates:
            from fedprompt.flower.secure import secure_round

            secure_round(self, grid, round_idx)
        else:
            messages = self.configure_train(round_idx, ArrayRecord(), ConfigRecord(), grid)
            replies = self._send(grid, list(messages))
            self.aggregate_train(round_idx, replies)
        pending = self._pending
        losses = pending["losses"]
        row = {"round": round_idx, "train_loss": sum(losses) / len(losses) if losses else None,
               "clients": sampled, "bytes_up": pending["bytes_up"], "bytes_down": bytes_down,
               "parallel_clients": fed.group_size}
        if pending["failed"]:
            row["failed_clients"] = {str(c): why for c, why in sorted(pending["failed"].items())}
        row["train_seconds"] = time.perf_counter() - start
        return row


def make_server_app(settings: dict | None = None) -> ServerApp:
    """A fedprompt :class:`~flwr.serverapp.ServerApp`; ``settings`` fill in run-config keys (for Flower's in-process
    simulation API, which has no run config of its own)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            options = AppOptions.from_config(context.run_config, settings)
            strategy = FedPromptStrategy(run_args(options.config, options.args), options)
            strategy.start(grid)
        except FedPromptError as err:
            _say(f"error: {err}")
            raise

    return app


#: the ServerApp that ``flwr run`` loads (``fedprompt.flower.server_app:app``)
app = make_server_app()
