"""The in-process transport over Lightning Fabric's collectives (``fedprompt fit``), written SPMD over the ranks.

Every rank holds the backbone once, client modules with K slots and the state of every client (prompts are
kilobytes). Each round every rank takes its share of the round's clients (round-robin,
:func:`fedprompt.federation.sampling.place`), trains them K at a time in lock-step, and the ranks exchange what the
server needs: every trained client's report, state and upload (``all_gather_object``; the rule then runs
identically on every rank over the uploads in client-id order, so the global state is bit-identical for any number
of processes), or, for ``reduce`` rules, only the reports, and the uploads' float64 sums by one all-reduce. Every
rank then merges the new global state into every client. Evaluation is spread the same way. Client modules never go
through ``fabric.setup`` (DDP would average different clients' gradients).
"""

from __future__ import annotations

import time

import torch.distributed as dist

from fedprompt.errors import FedPromptError
from fedprompt.federation.checkpoint import require_client_states
from fedprompt.federation.sampling import place
from fedprompt.progress import tqdm


def all_gather_objects(fabric, obj) -> list:
    """Every rank's ``obj`` (a list with one entry per rank; ``[obj]`` on a single process)."""
    if fabric.world_size == 1:
        return [obj]
    out = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


class FabricTransport:
    """Clients in this process, states exchanged by Fabric collectives (see the module docstring).

    Args:
        pool: every client's state and the modules (:class:`~fedprompt.federation.clients.ClientPool`).
        server: this rank's server (:class:`~fedprompt.federation.server.Server`).
        evaluator: the evaluator (:class:`~fedprompt.federation.evaluator.Evaluator`).
        progress: show the clients' progress bars (rank 0).
    """

    def __init__(self, pool, server, evaluator, progress: bool = True):
        self.pool = pool
        self.server = server
        self.evaluator = evaluator
        self.progress = progress
        self._local: dict = {}  # this rank's clients of the round (LocalResult)
        self._gathered: dict = {}  # every trained client's (state, upload), in the "uploads" form

    @property
    def fabric(self):
        return self.pool.fabric

    def _mine(self, cids: list[int]) -> list[int]:
        return place(cids, self.fabric.global_rank, self.fabric.world_size)

    def train(self, round_idx: int, cids: list[int]) -> dict:
        mine = self._mine(cids)
        bar = tqdm(total=len(mine), desc=f"round {round_idx} clients", leave=False, disable=not self.progress)
        if getattr(self.server.aggregator, "in_turn", False):
            self._local = self._train_in_turn(round_idx, mine, bar.update)
        else:
            self._local = self.pool.train(mine, round_idx, self.server.global_state, on_group=bar.update)
        bar.close()
        tic = time.perf_counter()
        reports: dict = {}
        if self.server.form == "sum":
            self.pool.check_whole_upload(self._local)
            for part in all_gather_objects(self.fabric, {cid: r.report for cid, r in self._local.items()}):
                reports.update(part)
        else:
            mine = {cid: (r.report, r.state, r.upload) for cid, r in self._local.items()}
            for part in all_gather_objects(self.fabric, mine):
                for cid, (report, state, upload) in part.items():
                    reports[cid] = report
                    self._gathered[cid] = (state, upload)
        if self.pool.timer is not None:
            self.pool.timer.add("communication", time.perf_counter() - tic)
        return dict(sorted(reports.items()))

    def _train_in_turn(self, round_idx: int, cids: list[int], on_group) -> dict:
        """The round's clients one at a time, in the sampler's order: each receives the server's download as it is
        then (with the uploads of the clients before it in this round) and shares its own upload at once (an
        ``in_turn`` rule; K = 1 on one process, checked before the run by
        :func:`fedprompt.build.check_round_order`)."""
        if self.fabric.world_size > 1 or self.pool.group_size > 1:
            raise FedPromptError(f"{self.pool.method.name}: the release's client order trains a round's clients one "
                                 "at a time on one process; run it with --federation.parallel_clients 1 on one "
                                 "device.")
        results: dict = {}
        for cid in cids:
            self.pool.receive(cid, self.server.download(cid))
            results.update(self.pool.train([cid], round_idx, self.server.global_state, on_group=on_group))
            if results[cid].report.failure is None:
                self.server.share(cid, results[cid].upload)
        return results

    def merge(self, round_idx: int, ok: list[int]) -> None:
        if self.server.form == "uploads":
            self.server.merge(round_idx, uploads={cid: self._gathered[cid][1] for cid in ok})
            return
        sums = self.server.partial_sum({cid: r.upload for cid, r in self._local.items() if cid in ok})
        fabric = self.fabric
        if fabric.world_size > 1:
            sums = {k: fabric.all_reduce(v.to(fabric.device), reduce_op="sum").cpu() for k, v in sums.items()}
        self.server.merge(round_idx, sums=sums)

    def deliver(self, round_idx: int, ok: list[int], merged: bool, evaluate: bool) -> dict | None:
        pool = self.pool
        for cid in ok:
            if cid in self._gathered:  # (a reduce rule's clients take the whole global state below)
                pool.states[cid] = self._gathered[cid][0]
        self._local, self._gathered = {}, {}
        if merged:
            for cid in pool.states:
                pool.receive(cid, self.server.download(cid))
        return self.scores() if evaluate else None

    def scores(self) -> dict:
        """Every client's scores, computed by the ranks for their share of the clients and sets, then gathered."""
        mine = self._mine(list(range(len(self.pool.clients))))
        bar = tqdm(total=len(mine), desc="evaluating", leave=False, disable=not self.progress)
        local = self.evaluator.score(self.pool, mine, self._mine, bar)
        bar.close()
        scores: dict = {}
        for part in all_gather_objects(self.fabric, local):
            for cid, values in part.items():
                scores.setdefault(cid, {}).update(values)
        return scores

    def client_states(self) -> dict:
        return dict(self.pool.states)

    def restore(self, states: dict, round_idx: int) -> None:
        require_client_states(states, "--runtime fabric")
        self.pool.states = dict(states)
