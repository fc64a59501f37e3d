"""Run a Flower app's ServerApp and ClientApps in this process, without Ray or network: a :class:`LocalGrid` hands
each message to the destination node's ClientApp (with that node's own :class:`~flwr.app.Context`, kept across
messages as a SuperNode keeps it) and returns the replies; an exception in a ClientApp becomes an error reply, as
Flower's runtimes make it.

Every message goes through Flower's object serialisation (``deflate`` / ``inflate``) both ways, so what a node
receives is what would cross the network. :func:`run_flower` runs a command's settings this way (``fedprompt fit
--runtime flower``); :func:`fedprompt.flower.local.run_local` a config file as ``flwr run`` would. The other runtimes
are the simulation engine (:mod:`fedprompt.flower.simulation`) and a deployment (SuperLink / SuperNodes).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from fedprompt.flower import require_flower

require_flower()  # one clear line without the flower extra

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedprompt.federation.checkpoint import require_client_states
from fedprompt.flower.options import AppOptions

_ids = itertools.count(1)


def _through_the_wire(message: Message) -> tuple[Message, int]:
    """The message as a node receives it (every object deflated to bytes and inflated again), and its size in
    bytes (the deflated objects: what Flower transfers)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    size = sum(len(data) for data in objects.values())
    return inflate_object_from_contents(message.object_id, objects, keep_object_contents=False), size


class LocalGrid(Grid):
    """A grid of in-process nodes: ``node_configs[i]`` is node ``i + 1``'s node config (``partition-id``, ...).

    Args:
        client_app: the ClientApp every node runs.
        node_configs: one node config per node.
        run_config: the run config the nodes see.
        serialize: pass every message through Flower's serialisation (default).
    """

    def __init__(self, client_app, node_configs: list[dict], run_config: dict | None = None, serialize: bool = True):
        self.client_app = client_app
        self.serialize = serialize
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config=dict(cfg), state=RecordDict(),
                                        run_config=dict(run_config or {})) for i, cfg in enumerate(node_configs)}
        self.down: set[int] = set()  # nodes that do not answer (a test stops them)
        self.down_from: dict[int, int] = {}  # node -> the round from which it no longer answers
        #: (message type, group id = round, node, "down" | "up", bytes) of every message that crossed the "wire"
        self.traffic: list[tuple[str, str, int, str, int]] = []
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run_id: int) -> None:
        self._run = run_id

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        received = message
        if self.serialize:
            received, size = _through_the_wire(message)
            received.metadata.__dict__["_message_id"] = message.metadata.message_id  # a node knows what it answers
            self.traffic.append((message.metadata.message_type, message.metadata.group_id, node, "down", size))
        try:
            reply = self.client_app(received, self.contexts[node])
        except Exception as err:  # noqa: BLE001 - what the runtimes do: an error reply to the server
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"),
                           reply_to=received)
        if not self.serialize:
            return reply
        reply, size = _through_the_wire(reply)
        self.traffic.append((message.metadata.message_type, message.metadata.group_id, node, "up", size))
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grids do
            node, group = message.metadata.dst_node_id, message.metadata.group_id
            if node in self.down or (node in self.down_from and group.isdigit()
                                     and int(group) >= self.down_from[node]):
                continue
            ids.append(f"r{next(_ids)}")
            self._replies[ids[-1]] = self._deliver(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_grid(server_app, client_app, node_configs: list[dict], run_config: dict | None = None,
             down_from: dict[int, int] | None = None) -> LocalGrid:
    """Run ``server_app`` against one in-process node per node config (``down_from``: node id -> the round from
    which it stops answering); returns the grid (its nodes' contexts hold the clients' states)."""
    _as_a_runtime()
    grid = LocalGrid(client_app, node_configs, run_config)
    grid.down_from = dict(down_from or {})
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config or {})))
    return grid


def run_flower(mode: str, run) -> dict:
    """A command's run as a Flower app in this process (``--runtime flower``): the ServerApp and one ClientApp node
    per client, every message through Flower's serialisation; every client's state is reported to the server (so
    the checkpoint holds it, as ``fedprompt fit``'s does). Returns the summary."""
    from fedprompt.build import read_data_and_check_weights
    from fedprompt.flower.client import make_client_app
    from fedprompt.flower.server import FlowerServer

    splits = read_data_and_check_weights(run)
    num_clients = 1 if run.federation.central else len(splits.clients)
    server = FlowerServer(run, AppOptions(config="", report_states=True), mode, announce=False, splits=splits)
    if server.checkpoint is not None:  # its nodes are new: they have no state of their own
        require_client_states(server.checkpoint["clients"], "--runtime flower")
    grid = LocalGrid(make_client_app(run=run, splits=splits), [{"partition-id": i} for i in range(num_clients)])
    _as_a_runtime()
    return server.start(grid)


def _as_a_runtime() -> None:
    """What a Flower runtime sets for the app it runs (the identity of its run, node and task)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
