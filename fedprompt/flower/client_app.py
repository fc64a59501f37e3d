"""The fedprompt ClientApp: one fedprompt client per Flower node.

A node is told which client it is by its node config (``partition-id``; the simulation engine sets it, a SuperNode
takes ``--node-config "partition-id=0 data-root=/data/pacs state-dir=/var/fedprompt"``). The first message of a
process builds the backbone, the method's client module and this client's data split from the run's fedprompt config
(:class:`fedprompt.flower.runtime.Node`, cached for the process). Three message types:

- ``query``: the node's :func:`~fedprompt.flower.runtime.fingerprint` (method, settings, shared keys, shapes,
  clients), so the server maps clients to nodes and leaves out a node whose config differs from its own;
- ``train``: the global state of the previous round (the method's download for this client) and the aggregator's
  state; the client merges it into its own state, trains one local round with fedprompt's engine, and replies with
  its upload (the shared tensors), its sample count and its metrics (``loss``, ``steps``); with the SecAgg+ setting
  the same training answers Flower's SecAgg+ protocol (``secaggplus_mod``), so the server only sees the sum;
- ``evaluate``: the new global state; the client merges it (every client, every round, as fedprompt's loop does)
  and, when the round is evaluated, scores itself on its own test data (and the evaluation sets it belongs to).

What is kept where: the client's own state (:class:`~fedprompt.flower.runtime.ClientRecord`: its end-of-round states
and its last trained state, local tensors included) lives in the app's ``context.state`` (one ``ArrayRecord`` per
kept state and a ``ConfigRecord``), which Flower keeps across rounds for the life of the node; with a node-config
``state-dir`` it is also written to ``STATE_DIR/client-<id>.pt`` after every message, so a restarted SuperNode
continues from it. The backbone, the data and the client module live in the process (one per message under a
SuperNode's subprocess isolation, one per simulation actor), rebuilt from the config when a process starts.
"""

from __future__ import annotations

import json
import sys

from fedprompt.flower import require_flower

require_flower()  # one clear line without the flower extra

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.errors import FedPromptError
from fedprompt.flower import options as opts
from fedprompt.flower.runtime import ClientRecord, Node, evaluation_to_flat, from_bytes, run_args, state_file

#: the built client of each (settings, partition) in this process
_NODES: dict[tuple, Node] = {}

_RECORD = "fedprompt.client"


def _say(message: str) -> None:
    print(f"fedprompt: {message}", file=sys.stderr, flush=True)


def partition_id(context: Context) -> int:
    """This node's client id (``partition-id`` of its node config); one clear line when it is missing or bad."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise FedPromptError("this node has no partition-id: start the SuperNode with --node-config "
                             "\"partition-id=N\" (N: the fedprompt client it holds, 0-based).")
    if isinstance(value, bool) or not isinstance(value, int) and not str(value).isdigit():
        raise FedPromptError(f"node-config partition-id={value!r} is not a client id (a non-negative integer).")
    return int(value)


def node_for(context: Context, settings: dict) -> Node:
    """The fedprompt client of this node in this process (built on first use; one line and an error reply for a
    bad partition id or config)."""
    app = opts.AppOptions.from_config(context.run_config, settings)
    cid = partition_id(context)
    data_root = context.node_config.get("data-root")
    node_args = str(context.node_config.get("args", ""))
    key = (app.config, app.args, node_args, data_root, cid)
    if key not in _NODES:
        run = run_args(app.config, app.args, node_args, data_root)
        _NODES[key] = Node(run, cid)
    return _NODES[key]


def _load_record(context: Context, node: Node, key: str) -> ClientRecord:
    """The client's record: from the context (Flower keeps it for the node's life), else from the node's state file,
    else a fresh one (the initial prompts)."""
    meta = context.state.config_records.get(_RECORD)
    if meta is not None and meta.get("run_key") == key and int(meta.get("cid", -1)) == node.cid:
        versions = {int(v): context.state.array_records[f"{_RECORD}.v{v}"].to_torch_state_dict()
                    for v in json.loads(str(meta["versions"]))}
        trained = None
        if int(meta.get("trained_round", -1)) >= 0:
            trained = (int(meta["trained_round"]),
                       context.state.array_records[f"{_RECORD}.trained"].to_torch_state_dict())
        return ClientRecord(node.cid, key, versions, trained)
    path = state_file(context.node_config.get("state-dir"), node.cid)
    if path is not None:
        saved = ClientRecord.load(path)
        if saved is not None and saved.run_key == key and saved.cid == node.cid:
            return saved
    return ClientRecord(node.cid, key)


def _arrays(state: dict) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def _save_record(context: Context, record: ClientRecord) -> None:
    """Keep the record in the context (``ArrayRecord`` per state) and, with a ``state-dir``, in the node's file."""
    for name in [n for n in context.state.array_records if n.startswith(f"{_RECORD}.")]:
        del context.state[name]
    for version, state in record.versions.items():
        context.state[f"{_RECORD}.v{version}"] = _arrays(state)
    if record.trained is not None:
        context.state[f"{_RECORD}.trained"] = _arrays(record.trained[1])
    context.state[_RECORD] = ConfigRecord({
        "cid": record.cid, "run_key": record.run_key, "versions": json.dumps(sorted(record.versions)),
        "trained_round": record.trained[0] if record.trained is not None else -1})
    path = state_file(context.node_config.get("state-dir"), record.cid)
    if path is not None:
        record.save(path)


def _instructions(msg: Message) -> tuple[dict, dict, dict]:
    """(config, received global state, aggregator state) of a fedprompt message."""
    cfg = dict(msg.content.config_records["fedprompt"])
    received = msg.content.array_records["download"].to_torch_state_dict() \
        if "download" in msg.content.array_records else {}
    if "restore" in msg.content.array_records:  # a resumed run sends back the client's state from its checkpoint
        cfg["restore"] = msg.content.array_records["restore"].to_torch_state_dict()
    return cfg, received, from_bytes(cfg.pop("aggregator"))


def _restored(record: ClientRecord, cfg: dict, version: int) -> None:
    if "restore" in cfg:
        record.versions = {version: cfg["restore"]}
        record.trained = None


def _checked(node: Node, cfg: dict) -> None:
    if int(cfg["cid"]) != node.cid:
        raise FedPromptError(f"the server sent client {cfg['cid']}'s instructions to the node of client {node.cid}.")


def make_client_app(settings: dict | None = None) -> ClientApp:
    """A fedprompt :class:`~flwr.clientapp.ClientApp`; ``settings`` fill in run-config keys (for Flower's
    in-process simulation API, which has no run config of its own)."""
    settings = dict(settings or {})
    app = ClientApp()

    def guarded(handler):
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except FedPromptError as err:  # bad input on this node: one line here, an error reply for the server
                _say(f"error: {err}")
                raise
        return run

    @app.query()
    @guarded
    def query(msg: Message, context: Context) -> Message:
        node = node_for(context, settings)
        content = RecordDict({"fedprompt": ConfigRecord({"cid": node.cid, "num_train": node.num_train,
                                                         "fingerprint": json.dumps(node.fingerprint)})})
        return Message(content, reply_to=msg)

    def train_reply(msg: Message, context: Context, legacy: bool) -> Message:
        node = node_for(context, settings)
        if legacy:
            from fedprompt.flower.secure import read_fit_instructions

            cfg, received, agg_state = read_fit_instructions(msg)
        else:
            cfg, received, agg_state = _instructions(msg)
        _checked(node, cfg)
        record = _load_record(context, node, str(cfg["run_key"]))
        _restored(record, cfg, int(cfg["version"]))
        result, upload = node.train(record, int(cfg["round"]), received, agg_state, bool(cfg.get("counted", True)))
        _save_record(context, record)
        if legacy:
            from fedprompt.flower.secure import fit_reply

            if result.failure is not None:  # no share of a failed client may enter the sum: drop out of the protocol
                raise FedPromptError(f"client {node.cid} failed in round {cfg['round']}: {result.failure}")
            return fit_reply(msg, node, upload, result)
        metrics = MetricRecord({"loss": result.loss if result.failure is None else 0.0, "steps": result.steps,
                                "num-examples": node.num_train})
        info = ConfigRecord({"cid": node.cid, "failure": result.failure or ""})
        return Message(RecordDict({"upload": _arrays(upload), "metrics": metrics, "fedprompt": info}), reply_to=msg)

    def secure_when_asked(msg: Message, context: Context, call_next) -> Message:
        """Flower's SecAgg+ client mod for the messages of its protocol; fedprompt's own train messages pass."""
        from flwr.client.mod import secaggplus_mod

        if "secaggplus_configs" in msg.content.config_records:
            return secaggplus_mod(msg, context, call_next)
        return call_next(msg, context)

    @app.train(mods=[secure_when_asked])
    @guarded
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, legacy="fitins.parameters" in msg.content.array_records)

    @app.evaluate()
    @guarded
    def evaluate(msg: Message, context: Context) -> Message:
        node = node_for(context, settings)
        cfg, received, agg_state = _instructions(msg)
        _checked(node, cfg)
        record = _load_record(context, node, str(cfg["run_key"]))
        _restored(record, cfg, int(cfg["version"]))
        state = node.state_at(record, int(cfg["version"]), received, agg_state, bool(cfg.get("counted", False)))
        _save_record(context, record)
        content = RecordDict({"fedprompt": ConfigRecord({"cid": node.cid})})
        if cfg.get("evaluate"):
            content["metrics"] = MetricRecord(evaluation_to_flat(node.evaluate(state)))
        if cfg.get("report_state"):
            content["state"] = _arrays(state)
        return Message(content, reply_to=msg)

    return app


#: the ClientApp that ``flwr run`` loads (``fedprompt.flower.client_app:app``)
app = make_client_app()
