"""The server: the global state, the merge of a round's uploads, the failure policy and the privacy accounting.

The server's rule is the method's :class:`~fedprompt.federation.aggregators.Aggregator`, or a rule around it (the
DP-FedAvg server of :mod:`fedprompt.federation.privacy`: clipped, noised, uniform mean over the updates). A round's
merge is a pipeline, the same in every runtime:

1. :meth:`Server.begin_round`: the rule sees the global state the round starts from;
2. the clients' uploads reach the server by the transport, each one (:attr:`Server.form` ``"uploads"``) or only
   their sum (``"sum"``: an all-reduce of per-process sums for ``reduce`` rules such as FedTPG's, or Flower's
   SecAgg+); every :attr:`Server.upload_steps` entry then sees each upload (the place for a server-side step over
   single updates, e.g. norm bounding, which a sum-only transport cannot offer);
3. :meth:`Server.merge`: the rule's ``aggregate`` (or ``finish`` of the sum) gives the new global state;
4. :meth:`Server.round_metrics`: what the rule reports (``epsilon`` of client-level DP) and the record-level
   ``record_epsilon`` of methods that noise every local step (DP-FPL), from the sampler's membership.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, state_bytes
from fedprompt.federation.accounting import record_privacy_row
from fedprompt.federation.protocols import MethodSpec

State = dict[str, torch.Tensor]

#: a server-side step over the single uploads of a round, before the rule merges them:
#: ``step(uploads, global_state, round_idx) -> uploads``
ServerStep = Callable[[dict[int, State], State, int], dict[int, State]]


class Server:
    """The server of a federation (one per process under Fabric, where every rank runs it identically).

    Args:
        method: the method (``communicates``, ``trains``, ``record_privacy``).
        aggregator: the server's rule.
        sizes: every client's number of train samples (the aggregation weights).
        federation: the federation settings (``on_client_failure``).
        sampler: the round membership (record-level privacy).
        train: the local-training settings (record-level privacy).
    """

    def __init__(self, method: MethodSpec, aggregator: Aggregator, sizes: list[int], federation, sampler, train):
        self.method = method
        self.aggregator = aggregator
        self.sizes = list(sizes)
        self.federation = federation
        self.sampler = sampler
        self.train = train
        self.global_state: State = {}
        self.upload_steps: list[ServerStep] = []

    @property
    def form(self) -> str:
        """How the uploads must reach the server: ``"sum"`` (only their float64 weighted sum: the rule is a
        ``reduce`` one) or ``"uploads"`` (each one)."""
        return "sum" if self.aggregator.reduce and self.method.communicates else "uploads"

    def start(self, initial: State) -> None:
        """The global state before round 1: the shared part of the initial prompts."""
        self.global_state = self.aggregator.upload(-1, initial, 0) if self.method.communicates else {}

    def restore(self, global_state: State, aggregator_state: dict) -> None:
        self.global_state = global_state
        self.aggregator.load_state_dict(aggregator_state)

    def begin_round(self, round_idx: int) -> None:
        self.aggregator.begin_round(round_idx, self.global_state)

    def download(self, cid: int) -> State:
        """What client ``cid`` receives of the current global state (nothing before any global state exists)."""
        return self.aggregator.download(self.global_state, cid) if self.global_state else {}

    def share(self, cid: int, upload: State) -> None:
        """An ``in_turn`` rule's mid-round step: client ``cid``'s upload reaches the downloads of the round's later
        clients (:meth:`fedprompt.federation.aggregators.Aggregator.share`)."""
        self.aggregator.share(cid, upload)

    def bytes_down(self, cids: list[int]) -> int:
        return sum(state_bytes(self.download(cid)) for cid in cids) if self.global_state else 0

    def weights(self, cids) -> dict[int, int]:
        return {cid: self.sizes[cid] for cid in cids}

    # ------------------------------------------------------------------------------------------------ a round
    def failures(self, reports: dict, round_idx: int) -> dict[int, str]:
        """The failed clients of a round (client id order) and why; with ``on_client_failure: raise`` a failed
        training (not a client the transport lost) stops the run here."""
        failed = {cid: r.failure for cid, r in sorted(reports.items()) if r.failure}
        trained_badly = {cid: why for cid, why in failed.items() if not reports[cid].lost}
        if trained_badly and self.federation.on_client_failure == "raise":
            details = "; ".join(f"client {c}: {why}" for c, why in trained_badly.items())
            raise FedPromptError(f"round {round_idx}: {details}. The last checkpoint holds the previous round; "
                                 "lower the learning rate or use --federation.on_client_failure skip.")
        return failed

    def merges(self, ok: list[int]) -> bool:
        """Whether the round makes a new global state (a method that communicates, with uploads, or a rule that
        merges empty rounds too: DP-FedAvg's noise)."""
        return self.method.communicates and (bool(ok) or self.aggregator.aggregates_empty_rounds)

    def partial_sum(self, uploads: dict[int, State]) -> State:
        """This process's share of a ``"sum"`` merge (the rule's float64 ``partial_sum`` of its uploads)."""
        return self.aggregator.partial_sum(uploads, self.weights(uploads), self.global_state)

    def merge(self, round_idx: int, uploads: dict[int, State] | None = None, sums: State | None = None,
              merged: State | None = None) -> None:
        """The new global state from the round's ``uploads`` (the ok clients'), their summed ``sums`` (every
        process's :meth:`partial_sum` added), or a transport's own ``merged`` mean (SecAgg+)."""
        if merged is not None:
            self.global_state = merged
        elif sums is not None:
            self.global_state = self.aggregator.finish(sums, self.global_state)
        else:
            for step in self.upload_steps:
                uploads = step(uploads, self.global_state, round_idx)
            self.global_state = self.aggregator.aggregate(uploads, self.weights(uploads), round_idx)

    def round_metrics(self, round_idx: int) -> dict:
        """The server's entries of the round's row: the rule's (``epsilon`` of client-level DP) and, for a method
        that adds record-level noise in every local step, ``record_epsilon``."""
        row = dict(self.aggregator.round_metrics())
        record = self.method.record_privacy
        if record is not None and self.method.trains:
            row.update(record_privacy_row(record, self.sampler.rounds_trained(round_idx), self.sizes, self.train))
        return row


def mean_loss(losses: list[float]) -> float | None:
    """The mean of the finite losses (``None`` when there are none)."""
    values = [loss for loss in losses if not math.isnan(loss)]
    return sum(values) / len(values) if values else None
