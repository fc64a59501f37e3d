"""One federated round, written once: the round driver and the transport seam.

:meth:`RoundDriver.run_round` is the whole round, the same in every runtime:

1. the sampler's clients (:class:`~fedprompt.federation.sampler.Sampler`): sampled, dropped out, trained;
2. the server's rule sees the global state the round starts from (``begin_round``); the bytes each sampled client
   receives are counted;
3. the transport trains the clients where they live and brings back their reports
   (:meth:`Transport.train`); failed clients are left out or stop the run (``federation.on_client_failure``);
4. the server merges the uploads (each one, or their sum: :meth:`Transport.merge` hands them to
   :meth:`~fedprompt.federation.server.Server.merge`), then reports its privacy accounting;
5. every client merges the new global state, and, in evaluated rounds, is scored where it lives
   (:meth:`Transport.deliver`); the evaluator summarises the scores (:class:`~fedprompt.federation.evaluator.
   Evaluator`);
6. the metrics row; rounds in which no sampled client reported are told on the console and stop the run after
   ``federation.max_failed_rounds`` in a row (:class:`SilentRounds`).

How states travel is the :class:`Transport`: in process and over Fabric collectives
(:class:`fedprompt.federation.fabric_transport.FabricTransport`, ``fedprompt fit``), or Flower messages
(:class:`fedprompt.flower.transport.FlowerTransport`: the ServerApp and its ClientApps).
"""

from __future__ import annotations

import time
from typing import Protocol

from fedprompt.errors import FedPromptError, warn
from fedprompt.federation.checkpoint import state_shapes
from fedprompt.federation.clients import Report
from fedprompt.federation.server import mean_loss


class Transport(Protocol):
    """How a round's states travel between the server and the clients."""

    def train(self, round_idx: int, cids: list[int]) -> dict[int, Report]:
        """Train the clients ``cids`` wherever they live (each from its state and the server's download of the
        global state) and bring every one's :class:`~fedprompt.federation.clients.Report` back to the server
        (client id order); a client the transport cannot reach is a ``lost`` report."""

    def merge(self, round_idx: int, ok: list[int]) -> None:
        """Bring the uploads of the clients ``ok`` to the server in its :attr:`~fedprompt.federation.server.Server.
        form` (each one, or their sum) and let it merge them."""

    def deliver(self, round_idx: int, ok: list[int], merged: bool, evaluate: bool) -> dict | None:
        """End the round on the clients' side: the clients ``ok`` keep their trained state, and, when the server
        ``merged`` a new global state, every client merges its download of it; when ``evaluate``, every client is
        scored where it lives and every client's scores come back (else ``None``)."""

    def client_states(self) -> dict:
        """Every client state the server holds (for the checkpoint; empty when they stay with their clients)."""

    def restore(self, states: dict, round_idx: int) -> None:
        """The clients continue from ``states`` (a checkpoint's, of round ``round_idx``; may be empty: the clients
        keep their own)."""


class RoundDriver:
    """Runs the rounds of a federation over a transport.

    Args:
        sampler: who takes part (:class:`~fedprompt.federation.sampler.Sampler`).
        server: the global state and its rule (:class:`~fedprompt.federation.server.Server`).
        evaluator: scores and summaries (:class:`~fedprompt.federation.evaluator.Evaluator`).
        transport: how states travel (:class:`Transport`).
        rounds: ``federation.rounds`` (the last round is always evaluated).
        initial: the initial client state (its shapes go into checkpoints).
        group_size: the lock-step group size K of the clients (reported in the rows).
        timer: the round benchmark's section timer, or ``None``.
    """

    def __init__(self, sampler, server, evaluator, transport: Transport, rounds: int, initial: dict,
                 group_size=lambda: 1, timer=None):
        self.sampler = sampler
        self.server = server
        self.evaluator = evaluator
        self.transport = transport
        self.rounds = rounds
        self.shapes = state_shapes(initial)
        self.group_size = group_size
        self.timer = timer

    @property
    def method(self):
        return self.server.method

    @property
    def clients(self) -> list:
        return self.evaluator.clients

    def run_round(self, round_idx: int) -> dict:
        """One communication round (evaluated when the schedule says so); returns its metrics row."""
        start = time.perf_counter()
        sampled = self.sampler.sampled(round_idx)
        dropped = self.sampler.dropped(sampled, round_idx)
        self.server.begin_round(round_idx)
        bytes_down = self.server.bytes_down(sampled)
        reports = self.transport.train(round_idx, [cid for cid in sampled if cid not in dropped])
        tic = time.perf_counter()
        failed = self.server.failures(reports, round_idx)
        ok = [cid for cid in sorted(reports) if cid not in failed]
        merged = self.server.merges(ok)
        if merged:
            self.transport.merge(round_idx, ok)
        self._time("communication", tic)
        row = {"round": round_idx, "train_loss": mean_loss([reports[cid].loss for cid in ok]), "clients": sampled,
               "bytes_up": sum(reports[cid].upload_bytes for cid in ok), "bytes_down": bytes_down,
               "parallel_clients": self.group_size()}
        if failed:
            row["failed_clients"] = {str(c): why for c, why in failed.items()}
        if self.sampler.federation.drop_rate > 0:
            row["dropped_clients"] = dropped
        row["train_seconds"] = time.perf_counter() - start
        row.update(self.server.round_metrics(round_idx))  # epsilon (client-level DP), record_epsilon (DP-FPL)
        evaluate = self.evaluator.scheduled(round_idx, self.rounds)
        tic = time.perf_counter()
        scores = self.transport.deliver(round_idx, ok, merged, evaluate)
        if evaluate:
            row.update(self._summary(round_idx, scores))
            self._time("evaluation", tic)
        return row

    def evaluate(self, round_idx: int) -> dict:
        """Score every client as it is now (no training): the evaluation metrics (``evaluate``, ``zeroshot``)."""
        tic = time.perf_counter()
        out = self._summary(round_idx, self.transport.deliver(round_idx, [], False, True))
        self._time("evaluation", tic)
        return out

    def _summary(self, round_idx: int, scores: dict) -> dict:
        """The evaluator's summary of every client's scores; clients the transport could not score (a Flower node
        that did not answer) are named in one line and in the row (``unscored_clients``), their accuracies NaN."""
        out = self.evaluator.summarize(scores)
        missing = [cid for cid in range(len(self.clients)) if not scores.get(cid)]
        if missing:
            out["unscored_clients"] = missing
            warn(f"round {round_idx}: {len(missing)} of {len(self.clients)} clients could not be scored (clients "
                 f"{', '.join(map(str, missing[:8]))}{', ...' if len(missing) > 8 else ''}: no answer from their "
                 "nodes); their accuracies are NaN and the means leave them out.")
        return out

    def _time(self, section: str, since: float) -> None:
        if self.timer is not None:
            self.timer.add(section, time.perf_counter() - since)

    # ------------------------------------------------------------------------------------------ checkpoints
    def restore(self, checkpoint: dict, path: str) -> None:
        """Continue from a checkpoint (its shapes and clients checked first; memory only)."""
        from fedprompt.federation.checkpoint import check_shapes

        check_shapes(checkpoint, path, self.shapes)
        clients = checkpoint["clients"]
        if clients and len(clients) != len(self.clients):
            raise FedPromptError(f"--resume: the checkpoint has {len(clients)} clients but this config makes "
                                 f"{len(self.clients)}; resume with the config of the run (its hyperparameters.yaml).")
        self.server.restore(checkpoint["global"], checkpoint.get("aggregator", {}))
        self.transport.restore({int(cid): state for cid, state in clients.items()}, checkpoint["round"])

    def state(self, round_idx: int) -> dict:
        """The federation's part of a checkpoint after ``round_idx``: the global state, the clients' states the
        server holds, the rule's state, the method and its settings, the shapes."""
        method = self.method
        return {"round": round_idx, "global": self.server.global_state, "clients": self.transport.client_states(),
                "aggregator": self.server.aggregator.state_dict(), "method": method.name,
                "method_hparams": method.hparams(), "shapes": self.shapes}


class SilentRounds:
    """Rounds in which sampled clients did not report (every round with failed clients is told on the console);
    the run stops after ``limit`` consecutive rounds in which no sampled client reported (all failed, dropped out or
    were lost), counted over a resume from the metrics rows. A round that sampled no client (Poisson sampling)
    neither counts nor breaks the count."""

    def __init__(self, limit: int, previous: list[dict] = ()):
        self.limit = limit
        self.streak = 0
        for row in previous:
            self._count(row)

    @staticmethod
    def silent(row: dict) -> bool | None:
        """Whether no sampled client reported in the round of ``row`` (``None``: none was sampled)."""
        sampled = [str(c) for c in row.get("clients", [])]
        if not sampled:
            return None
        gone = set(row.get("failed_clients") or {}) | {str(c) for c in row.get("dropped_clients") or []}
        return set(sampled) <= gone

    def _count(self, row: dict) -> bool:
        silent = self.silent(row)
        if silent is not None:
            self.streak = self.streak + 1 if silent else 0
        return bool(silent)

    def update(self, row: dict, report: bool) -> None:
        """Count the round of ``row``; one line (on the process that ``report``\\ s) for a round with failed or
        silent clients; :class:`FedPromptError` when the streak reaches the limit."""
        round_idx, failed = row["round"], row.get("failed_clients") or {}
        if not self._count(row):
            if failed and report:
                warn(f"round {round_idx}: {len(failed)} of {len(row.get('clients', []))} sampled clients failed and "
                     f"were left out of the aggregation ({_shown(failed)}).")
            return
        head, why = _why_silent(row)
        if self.streak >= self.limit:
            raise FedPromptError(f"round {round_idx}: {head}, {self.streak} rounds in a row ({why}); no client "
                                 f"trains, so the run stops (federation.max_failed_rounds {self.limit}). "
                                 f"{_advice(row)}")
        if report:
            warn(f"round {round_idx}: {head} ({why}); no client trained this round ({self.streak} such round(s) in "
                 f"a row; the run stops at federation.max_failed_rounds {self.limit}).")


def _shown(failed: dict) -> str:
    shown = "; ".join(f"client {c}: {why}" for c, why in list(failed.items())[:3])
    return shown + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")


def _why_silent(row: dict) -> tuple[str, str]:
    """What a silent round's line says: its head (every sampled client failed, or none reported) and why."""
    failed, dropped = row.get("failed_clients") or {}, row.get("dropped_clients") or []
    if not dropped:
        return "every sampled client failed", _shown(failed)
    parts = [f"{len(dropped)} of {len(row['clients'])} dropped out (federation.drop_rate)"]
    if failed:
        parts.append(_shown(failed))
    return "no sampled client reported", "; ".join(parts)


def _advice(row: dict) -> str:
    if row.get("failed_clients"):
        return ("Lower the learning rate (or bring the clients' nodes back) and start a new run, or resume with a "
                "higher --federation.max_failed_rounds.")
    return "Lower --federation.drop_rate and start a new run, or resume with a higher --federation.max_failed_rounds."
