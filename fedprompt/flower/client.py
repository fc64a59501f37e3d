"""The fedprompt ClientApp: one fedprompt client per Flower node, a thin adapter between Flower's messages and the
node's client (:class:`fedprompt.flower.node.Node`).

A node is told which client it is by its node config (``partition-id``; the simulation engine sets it, a SuperNode
takes ``--node-config "partition-id=0 data-root=/data/pacs state-dir=/var/fedprompt"``). The first message of a
process builds the client from the run's settings (cached for the process). Three message types, each answered by
one call of the node:

- ``query``: the node's :func:`~fedprompt.flower.node.fingerprint` (method, settings, shared keys, shapes, clients),
  so the server maps clients to nodes and leaves out a node whose config differs from its own;
- ``train``: :meth:`Node.train <fedprompt.flower.node.Node.train>` from the message's download of the global state
  and the rule's state; the reply carries the upload and the report (with the SecAgg+ setting the same training
  answers Flower's SecAgg+ protocol through ``secaggplus_mod``, so the server only sees the sum);
- ``evaluate``: :meth:`Node.state_at <fedprompt.flower.node.Node.state_at>` (the client merges the round's new
  global state) and, in evaluated rounds, :meth:`Node.evaluate <fedprompt.flower.node.Node.evaluate>`.

What is kept where: the client's own state (:class:`~fedprompt.flower.node.ClientRecord`: its end-of-round states
and its last trained state, local tensors included) lives in the app's ``context.state`` (one ``ArrayRecord`` per
kept state and a ``ConfigRecord``), which Flower keeps across rounds for the life of the node; with a node-config
``state-dir`` it is also written to ``STATE_DIR/client-<id>.pt`` after every message, so a restarted SuperNode
continues from it. The backbone, the data and the client module live in the process (one per message under a
SuperNode's subprocess isolation, one per simulation actor), rebuilt from the config when a process starts.
"""

from __future__ import annotations

import json

from fedprompt.flower import require_flower

require_flower()  # one clear line without the flower extra

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.errors import FedPromptError
from fedprompt.flower import options as opts
from fedprompt.flower.node import ClientRecord, Node, from_bytes, state_file
from fedprompt.flower.transport import say

#: the built client of each (settings, partition) in this process
_NODES: dict[tuple, Node] = {}

_RECORD = "fedprompt.client"




def partition_id(context: Context) -> int:
    """This node's client id (``partition-id`` of its node config); one clear line when it is missing or bad."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise FedPromptError("this node has no partition-id: start the SuperNode with --node-config "
                             "\"partition-id=N\" (N: the fedprompt client it holds, 0-based).")
    if isinstance(value, bool) or not isinstance(value, int) and not str(value).isdigit():
        raise FedPromptError(f"node-config partition-id={value!r} is not a client id (a non-negative integer).")
    return int(value)


def node_for(context: Context, settings: dict, run=None, load_run=None, built: dict | None = None,
             splits=None) -> Node:
    """The fedprompt client of this node in this process (built on first use; one line and an error reply for a
    bad partition id or config): from ``run`` (an app made for one run's settings and data ``splits``, in this
    process; its nodes are kept in ``built``) or from the run config's fedprompt config file (``load_run``, with the
    node's own flags and data root)."""
    cid = partition_id(context)
    if run is not None:
        if cid not in built:
            built[cid] = Node(run, cid, splits=splits)
        return built[cid]
    app = opts.AppOptions.from_config(context.run_config, settings)
    data_root = context.node_config.get("data-root")
    node_args = str(context.node_config.get("args", ""))
    key = (app.config, app.args, node_args, data_root, cid)
    if key not in _NODES:
        _NODES[key] = Node(load_run(app.config, app.args, node_args, data_root), cid)
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


def _record_for(context: Context, node: Node, cfg: dict) -> ClientRecord:
    """The client's record for the message's run; a checkpoint's state sent back replaces it."""
    if int(cfg["cid"]) != node.cid:
        raise FedPromptError(f"the server sent client {cfg['cid']}'s instructions to the node of client {node.cid}.")
    record = _load_record(context, node, str(cfg["run_key"]))
    if "restore" in cfg:  # the client's state at the end of the checkpoint's round
        record.versions = {int(cfg["restored_round"]): cfg["restore"]}
        record.trained = None
    return record


def _flags(cfg: dict) -> dict:
    return {"counted": bool(cfg.get("counted", False)), "merged": bool(cfg.get("merged", True))}


def train_reply(node: Node, msg: Message, context: Context, legacy: bool) -> Message:
    """Answer a ``train`` message (a SecAgg+ one when ``legacy``): one local round, the upload and the report."""
    if legacy:
        from fedprompt.flower.secure import fit_reply, read_fit_instructions

        cfg, received, agg_state = read_fit_instructions(msg)
    else:
        cfg, received, agg_state = _instructions(msg)
    record = _record_for(context, node, cfg)
    report, upload = node.train(record, int(cfg["round"]), received, agg_state, **_flags(cfg))
    _save_record(context, record)
    if legacy:
        if report.failure is not None:  # no share of a failed client may enter the sum: drop out of the protocol
            raise FedPromptError(f"client {node.cid} failed in round {cfg['round']}: {report.failure}")
        return fit_reply(msg, node, upload, report)
    metrics = MetricRecord({"loss": report.loss if report.failure is None else 0.0, "steps": report.steps,
                            "num-examples": node.num_train})
    info = ConfigRecord({"cid": node.cid, "failure": report.failure or ""})
    return Message(RecordDict({"upload": _arrays(upload), "metrics": metrics, "fedprompt": info}), reply_to=msg)


def evaluate_reply(node: Node, msg: Message, context: Context) -> Message:
    """Answer an ``evaluate`` message: the client's state at the end of the round (the new global state merged),
    its scores in evaluated rounds, and its whole state when the server asks for it."""
    cfg, received, agg_state = _instructions(msg)
    record = _record_for(context, node, cfg)
    state = node.state_at(record, int(cfg["version"]), received, agg_state, **_flags(cfg))
    _save_record(context, record)
    content = RecordDict({"fedprompt": ConfigRecord({"cid": node.cid})})
    if cfg.get("evaluate"):
        content["metrics"] = MetricRecord(node.evaluate(state))
    if cfg.get("report_state"):
        content["state"] = _arrays(state)
    return Message(content, reply_to=msg)


def query_reply(node: Node, msg: Message) -> Message:
    """Answer a ``query``: which client this node holds, and its fingerprint."""
    content = RecordDict({"fedprompt": ConfigRecord({"cid": node.cid, "num_train": node.num_train,
                                                     "fingerprint": json.dumps(node.fingerprint)})})
    return Message(content, reply_to=msg)


def secure_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod for the messages of its protocol; fedprompt's own train messages pass."""
    from flwr.client.mod import secaggplus_mod

    if "secaggplus_configs" in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(settings: dict | None = None, run=None, load_run=None, splits=None) -> ClientApp:
    """A fedprompt :class:`~flwr.clientapp.ClientApp`: for one run's settings ``run`` (in this process; ``splits``:
    its data, read once for every node), or reading the run config's fedprompt config file with ``load_run``
    (:func:`fedprompt.flower.config.run_args`; ``settings`` fill in run-config keys, for Flower's in-process
    simulation API, which has no run config of its own)."""
    settings = dict(settings or {})
    app = ClientApp()
    built: dict[int, Node] = {}

    def handler(answer):
        def run_message(msg: Message, context: Context) -> Message:
            try:
                return answer(node_for(context, settings, run, load_run, built, splits), msg, context)
            except FedPromptError as err:  # bad input on this node: one line here, an error reply for the server
                say(f"error: {err}")
                raise
        return run_message

    app.query()(handler(lambda node, msg, context: query_reply(node, msg)))
    app.train(mods=[secure_when_asked])(handler(
        lambda node, msg, context: train_reply(node, msg, context, "fitins.parameters" in msg.content.array_records)))
    app.evaluate()(handler(evaluate_reply))
    return app
