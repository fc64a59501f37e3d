"""The clients' side of a round, wherever the clients live: their states, their modules, local training, the
upload each sends, and the merge of what each receives.

A :class:`ClientPool` holds some clients' states (every client on every Fabric rank; one client on a Flower node)
and the client modules that train them K at a time in lock-step (:mod:`fedprompt.federation.engine`). Both
transports call the same three operations, so a client computes the same thing in either runtime:

- :meth:`ClientPool.train`: each client's local round from its state and the round's global state, then its upload
  (``aggregator.upload``) and every :attr:`ClientPool.update_steps` entry (the place for client-side update
  manipulation, e.g. a simulated attack, shared by both transports);
- :meth:`ClientPool.receive`: a client merges what the server sent it (``aggregator.apply``);
- scoring, by :meth:`fedprompt.federation.evaluator.Evaluator.score` over the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import state_bytes
from fedprompt.federation.engine import GroupResult, GroupSize, LockstepTrainer, run_groups
from fedprompt.federation.protocols import ClientModule, MethodSpec

State = dict[str, torch.Tensor]

#: the most clients trained together by ``parallel_clients: auto``
AUTO_MAX_PARALLEL = 32

#: a client-side step applied to every successful upload after local training, on the client's own process:
#: ``step(client_id, upload, trained_state, round_idx) -> upload``
UpdateStep = Callable[[int, State, State, int], State]


@dataclass
class Report:
    """What the server learns of one client's local round (the upload travels beside it).

    Attributes:
        loss: the mean local loss (NaN when it failed or did not train).
        steps: local optimiser steps taken.
        failure: why its training failed (``None``: it succeeded).
        lost: the transport lost the client (no node holds it, its node failed or did not answer): it is left out
            like a failed client, but ``on_client_failure: raise`` does not stop the run for it.
        upload_bytes: the size of its upload.
    """

    loss: float = math.nan
    steps: int = 0
    failure: str | None = None
    lost: bool = False
    upload_bytes: int = 0


@dataclass
class LocalResult:
    """One client's local round where it ran: its new state and upload (``{}`` on failure) and its report."""

    state: State
    upload: State
    report: Report


def resolve_parallel_clients(setting, num_clients: int, world_size: int) -> GroupSize:
    """K clients per lock-step group. ``auto`` takes every client a rank trains in a round (at most
    :data:`AUTO_MAX_PARALLEL`) and halves K when the device runs out of memory (for the rest of the run)."""
    per_rank = max(1, math.ceil(num_clients / world_size))
    if setting == "auto":
        return GroupSize(min(per_rank, AUTO_MAX_PARALLEL), adaptive=True)
    return GroupSize(max(1, min(int(setting), per_rank)))


class ClientPool:
    """Clients' states and the modules that train and score them on this process.

    Args:
        fabric: Lightning Fabric (device, autocast, world size).
        method: the method (:class:`fedprompt.federation.protocols.MethodSpec`).
        backbone: the frozen backbone (one per process).
        classnames: the federation's class list.
        clients: every client's split (their class lists and train sizes).
        feed: this process's batches (:class:`fedprompt.federation.feed.Feed`).
        aggregator: this process's replica of the server's rule (``upload`` and ``apply`` run client-side).
        sampler: the round's local plans (:class:`fedprompt.federation.sampler.Sampler`).
        parallel_clients: the ``federation.parallel_clients`` setting (K).
        seed: the run seed (every module starts from the same initial prompts).
        timer: the round benchmark's section timer, or ``None``.
    """

    def __init__(self, fabric, method: MethodSpec, backbone, classnames: list[str], clients: list, feed, aggregator,
                 sampler, parallel_clients, seed: int, timer=None):
        self.fabric = fabric
        self.method = method
        self.backbone = backbone
        self.classnames = classnames
        self.clients = clients
        self.feed = feed
        self.aggregator = aggregator
        self.sampler = sampler
        self.seed = seed
        self.timer = timer
        self.states: dict[int, State] = {}
        self.modules: dict[tuple, ClientModule] = {}
        self.update_steps: list[UpdateStep] = []
        # lock-step groups hold clients of one class list: no group is larger than the largest set of clients that
        # share one (1 when every client has its own list, as in FedTPG's cross_cls)
        lists: dict[tuple, int] = {}
        for split in clients:
            lists[tuple(split.classnames or classnames)] = lists.get(tuple(split.classnames or classnames), 0) + 1
        if method.trains_in_turn:  # one client at a time (checked before the run: auto or 1)
            parallel_clients = 1
        self.group = resolve_parallel_clients(parallel_clients, max(lists.values()), fabric.world_size)
        self.module_slots = self.group.size  # the slots of every client module (K may shrink, never grow)
        self.trainer = LockstepTrainer(fabric, feed, timer)

    # ---------------------------------------------------------------------------------------------- modules
    @property
    def group_size(self) -> int:
        """The lock-step group size K now (smaller than at the start after an out-of-memory error)."""
        return self.group.size

    def module_for(self, classnames: list[str]) -> ClientModule:
        """A client module (``module_slots`` slots) set to a class list: the pool's module pointed at it, or, for
        methods whose prompts depend on the classes, a module built for it once."""
        key = tuple(classnames)
        first = self.modules.get(tuple(self.classnames))
        if first is not None and first.switchable_classes:
            first.set_classes(list(classnames))
            return first
        if key not in self.modules:
            torch.manual_seed(self.seed)  # the same initial prompts as the first module (the server's init)
            self.modules[key] = self.fabric.to_device(
                self.method.build_client(self.backbone, list(classnames), self.module_slots))
        return self.modules[key]

    @property
    def client(self) -> ClientModule:
        """The module of the federation's shared class list."""
        return self.module_for(self.classnames)

    def chunks(self, ids: list[int]) -> list[list[int]]:
        """``ids`` cut into lock-step groups of at most ``group_size``."""
        return [ids[begin:begin + self.group_size] for begin in range(0, len(ids), self.group_size)]

    def classnames_of(self, cid: int) -> list[str]:
        return self.clients[cid].classnames or self.classnames

    def initial_state(self) -> State:
        """The initial prompt state every client starts from (the server's initialisation)."""
        return self.client.slot_state(0)

    def start(self, initial: State) -> None:
        """Every client starts from ``initial`` (the server's initialisation), as the method makes it its own
        (``method.initial_client_state``: e.g. FedPHA's local prompt lengths)."""
        self.states = {cid: self.method.initial_client_state(cid, {k: v.clone() for k, v in initial.items()})
                       for cid in range(len(self.clients))}

    # ------------------------------------------------------------------------------------------------ a round
    def train(self, cids: list[int], round_idx: int, global_state: State, on_group=None) -> dict[int, LocalResult]:
        """Train the clients ``cids`` of this pool in ``round_idx`` from their states (``global_state``: the state
        the round starts from, for the methods' ``on_round_start``), ``group_size`` at a time; each successful
        client's upload, through :attr:`update_steps`."""
        if not self.method.trains:
            results = {cid: GroupResult(self.states[cid]) for cid in cids}
        else:
            plans = [self.sampler.plan(cid, round_idx) for cid in cids]
            results = run_groups(self.trainer, self.module_for, lambda p: self.classnames_of(p.cid), plans,
                                 self.group, self.states, global_state, on_group=on_group)
        return {cid: self._finish(cid, result, round_idx) for cid, result in results.items()}

    def _finish(self, cid: int, result: GroupResult, round_idx: int) -> LocalResult:
        if result.failure is not None:
            return LocalResult({}, {}, Report(math.nan, result.steps, result.failure))
        upload = self.aggregator.upload(cid, result.state, round_idx)
        for step in self.update_steps:
            upload = step(cid, upload, result.state, round_idx)
        return LocalResult(result.state, upload, Report(result.loss, result.steps, None,
                                                        upload_bytes=state_bytes(upload)))

    def check_whole_upload(self, results: dict[int, LocalResult]) -> None:
        """The reduce aggregation sums whole client states: a method that keeps local keys cannot use it."""
        for result in results.values():
            if result.report.failure is None and set(result.upload) != set(result.state):
                raise FedPromptError(f"{self.method.name}: the reduce aggregation needs the whole client state to be "
                                     "shared; this method keeps local keys (use the gather path).")

    def receive(self, cid: int, received: State) -> None:
        """Client ``cid`` merges what the server sent it into its state."""
        self.states[cid] = self.aggregator.apply(self.states[cid], received, cid)
