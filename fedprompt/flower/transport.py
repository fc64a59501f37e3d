"""The Flower transport: a round's states travel as Flower messages between the ServerApp and one ClientApp per
client (:class:`FlowerTransport`, the :class:`fedprompt.federation.round.Transport` of the Flower runtime).

Per round, for the round driver (:class:`fedprompt.federation.round.RoundDriver`):

- :meth:`FlowerTransport.train`: nodes not seen yet are asked which client they hold (``query``; a node whose config
  differs from the server's is left out with one line), then each trained client's node gets a ``train`` message
  (its download of the global state, the rule's state, and what its state at the end of the previous round is) and
  replies with its upload and report; a client without a node, whose node failed or did not answer in ``timeout``
  is a lost client. With ``secure-aggregation`` the training half is Flower's SecAgg+ instead
  (:mod:`fedprompt.flower.secure`): the server gets the weighted mean only;
- :meth:`FlowerTransport.merge`: the uploads (or their mean) go to the server's rule;
- :meth:`FlowerTransport.deliver`: every client's node gets an ``evaluate`` message (the new global state, if the
  round made one, and which clients the merge used), merges it, and, in evaluated rounds, replies with its scores
  (with ``report-states``: also its whole state, for the checkpoint).
"""

from __future__ import annotations

import json
import sys

import torch
from fedprompt.flower import require_flower

require_flower()  # one clear line without the flower extra

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedprompt.federation.aggregators import state_bytes
from fedprompt.federation.clients import Report
from fedprompt.flower.node import differences, fingerprint, to_bytes

State = dict[str, torch.Tensor]


def say(message: str) -> None:
    print(f"fedprompt: {message}", file=sys.stderr, flush=True)


def arrays(state: State) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


class FlowerTransport:
    """Clients on Flower nodes, states in messages (see the module docstring).

    Args:
        grid: Flower's grid (the ServerApp's connection to the nodes).
        options: the app's settings (:class:`fedprompt.flower.options.AppOptions`).
        parts: the server's roles (:class:`fedprompt.build.Parts`, built without images).
        key: the run's identity (a node's saved state belongs to one run).
    """

    def __init__(self, grid, options, parts, key: str):
        self.grid = grid
        self.options = options
        self.server = parts.server
        self.num_clients = len(parts.clients)
        self.key = key
        self.reference = fingerprint(parts)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.left_out: dict[int, str] = {}  # node id -> why it is not used
        self.counted: set[int] = set()  # the clients whose training the last merge used
        self.merged = True  # whether the last round made a new global state
        self.restoring: dict[int, State] = {}  # client states to send back (a resumed run's checkpoint)
        self.restored_round = 0  # the round of those states
        self.reported: dict[int, State] = {}  # with report-states: every client's state, for the checkpoint
        if options.report_states:
            self.reported = dict(parts.pool.states)  # every client's initial state
        self._uploads: dict[int, State] = {}
        self._mean: State | None = None

    # ------------------------------------------------------------------------------------------- nodes
    def discover(self) -> None:
        """Ask the nodes not seen yet which client they hold and check their config against the server's; a node
        without a usable client is left out with one line."""
        alive = set(self.grid.get_node_ids())
        self.nodes = {cid: nid for cid, nid in self.nodes.items() if nid in alive}  # a restarted node comes back new
        known = set(self.nodes.values()) | set(self.left_out)
        new = [nid for nid in sorted(alive) if nid not in known]
        messages = [Message(RecordDict({"fedprompt": ConfigRecord({"run_key": self.key})}), dst_node_id=nid,
                            message_type="query", group_id="discover") for nid in new]
        replies = self.send(messages)
        for nid in new:
            reply = replies.get(nid)
            if reply is None:
                continue  # asked again next round
            why = self._node_problem(nid, reply)
            if why is not None:
                self.left_out[nid] = why
                if not reply.has_error():  # the node printed its own error line; this one the server found
                    say(f"node {nid} is left out: {why}")
                continue
            self.nodes[int(reply.content.config_records["fedprompt"]["cid"])] = nid

    def _node_problem(self, nid: int, reply: Message) -> str | None:
        if reply.has_error():
            return reply.error.reason or "its ClientApp failed"
        info = reply.content.config_records["fedprompt"]
        cid = int(info["cid"])
        diff = differences(self.reference, json.loads(str(info["fingerprint"])))
        if diff:
            return (f"its config differs from the server's in {'; '.join(diff)} (client {cid}); start it with the "
                    "run's config")
        if cid in self.nodes and self.nodes[cid] != nid:
            return f"client {cid} is already held by node {self.nodes[cid]}"
        return None

    def send(self, messages: list[Message]) -> dict[int, Message]:
        """Send and wait for the replies (``timeout`` of the run config); returns them by destination node (an
        error reply of the SuperLink, e.g. "node unavailable" when a node stopped sending heartbeats, included)."""
        if not messages:
            return {}
        replies = list(self.grid.send_and_receive(messages, timeout=self.options.timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return {sent.get(r.metadata.reply_to_message_id or None, r.metadata.src_node_id): r for r in replies}

    def instructions(self, cid: int, version: int, **extra) -> dict:
        """A message's instructions for client ``cid``: the round, the run, the rule's state, and what its state at
        the end of round ``version`` is (``counted``, ``merged``)."""
        return {"cid": cid, "version": version, "run_key": self.key, "counted": cid in self.counted,
                "merged": self.merged, "aggregator": to_bytes(self.server.aggregator.state_dict()), **extra}

    def _content(self, cid: int, config: dict, download: bool = True) -> RecordDict:
        if cid in self.restoring:
            config = {**config, "restored_round": self.restored_round}
        content = RecordDict({"fedprompt": ConfigRecord(config)})
        if download:
            content["download"] = arrays(self.server.download(cid))
        if cid in self.restoring:
            content["restore"] = arrays(self.restoring[cid])
        return content

    def _lost(self, cid: int, reply: Message | None) -> Report | None:
        """The report of a client the transport lost (``None``: its reply is a reply)."""
        if cid not in self.nodes:
            return Report(failure="no node holds this client", lost=True)
        if reply is None:
            return Report(failure=f"no reply within {self.options.timeout:g} s", lost=True)
        if reply.has_error():
            return Report(failure=f"node {self.nodes[cid]} failed: {reply.error.reason}", lost=True)
        return None

    # ------------------------------------------------------------------------------------------- a round
    def train(self, round_idx: int, cids: list[int]) -> dict[int, Report]:
        self.discover()
        self._uploads, self._mean = {}, None
        if self.options.secure_aggregation and self.server.method.communicates:
            from fedprompt.flower.secure import secure_train

            self._send_restores()  # (SecAgg+'s own messages cannot carry them)
            reports, self._mean = secure_train(self, round_idx, cids)
            return reports
        messages = [Message(self._content(cid, self.instructions(cid, round_idx - 1, round=round_idx)),
                            dst_node_id=self.nodes[cid], message_type="train", group_id=str(round_idx))
                    for cid in cids if cid in self.nodes]
        replies = self.send(messages)
        reports = {}
        for cid in cids:
            reply = replies.get(self.nodes.get(cid, -1))
            reports[cid] = self._lost(cid, reply) or self._trained(cid, reply)
        return reports

    def _trained(self, cid: int, reply: Message) -> Report:
        self.restoring.pop(cid, None)  # the node has its state now
        info = reply.content.config_records["fedprompt"]
        metrics = reply.content.metric_records["metrics"]
        if info["failure"]:
            return Report(steps=int(metrics["steps"]), failure=str(info["failure"]))
        self._uploads[cid] = reply.content.array_records["upload"].to_torch_state_dict()
        return Report(float(metrics["loss"]), int(metrics["steps"]), upload_bytes=state_bytes(self._uploads[cid]))

    def merge(self, round_idx: int, ok: list[int]) -> None:
        server = self.server
        if self._mean is not None:
            server.merge(round_idx, merged=self._mean)
        elif server.form == "sum":
            server.merge(round_idx, sums=server.partial_sum({cid: self._uploads[cid] for cid in ok}))
        else:
            server.merge(round_idx, uploads={cid: self._uploads[cid] for cid in ok})

    def deliver(self, round_idx: int, ok: list[int], merged: bool, evaluate: bool) -> dict | None:
        self.discover()  # (an evaluation without a round has not met the nodes yet)
        self.counted, self.merged = set(ok), merged
        self._uploads, self._mean = {}, None
        messages = []
        for cid in range(self.num_clients):
            if cid in self.nodes:
                config = self.instructions(cid, round_idx, evaluate=evaluate,
                                           report_state=self.options.report_states)
                messages.append(Message(self._content(cid, config, download=merged), dst_node_id=self.nodes[cid],
                                        message_type="evaluate", group_id=str(round_idx)))
        replies = self.send(messages)
        scores: dict = {}
        for cid, nid in self.nodes.items():
            reply = replies.get(nid)
            if reply is None or reply.has_error():
                continue
            self.restoring.pop(cid, None)
            if "metrics" in reply.content.metric_records:
                scores[cid] = {k: [float(x) for x in v] if isinstance(v, list) else float(v)  # tallies, counts
                               for k, v in reply.content.metric_records["metrics"].items()}
            if "state" in reply.content.array_records:
                self.reported[cid] = reply.content.array_records["state"].to_torch_state_dict()
        return scores if evaluate else None

    def _send_restores(self) -> None:
        """Hand the checkpoint's states still to be sent to their nodes (each keeps its one as its state at the end
        of the checkpoint's round)."""
        messages = [Message(self._content(cid, self.instructions(cid, self.restored_round, evaluate=False),
                                          download=False), dst_node_id=self.nodes[cid], message_type="evaluate",
                            group_id="restore") for cid in self.restoring if cid in self.nodes]
        replies = self.send(messages)
        for cid, nid in list(self.nodes.items()):
            reply = replies.get(nid)
            if reply is not None and not reply.has_error():
                self.restoring.pop(cid, None)

    # ------------------------------------------------------------------------------------------ checkpoints
    def client_states(self) -> dict:
        return dict(self.reported)

    def restore(self, states: dict, round_idx: int) -> None:
        """A resumed run: the clients' states of the checkpoint (of round ``round_idx``, if it has them) go back to
        their nodes with the next message; the nodes keep their own otherwise."""
        self.restoring, self.restored_round = dict(states), round_idx
        if self.options.report_states:
            self.reported.update(states)
        self.counted = set()

    def checkpoint_extra(self) -> dict:
        """What a Flower run adds to its checkpoints: the run's identity, where the clients' states are, SecAgg+."""
        options = self.options
        return {"flower": {"run_key": self.key, "client_states": "checkpoint" if options.report_states else "nodes",
                           "secure_aggregation": options.secure_aggregation}}
