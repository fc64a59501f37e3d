"""The round loop, written SPMD over Lightning Fabric ranks.

Every rank holds the backbone once, client modules with K slots (one per class list; K =
``federation.parallel_clients``) and the state of every client (prompts are kilobytes). Each round every rank
computes the same client sample, takes its share of it (round-robin), and trains those clients K at a time in
lock-step (:mod:`fedprompt.federation.engine`); the ranks then exchange the updated client states
(``all_gather_object``). The aggregator runs identically on every rank over the uploads in client-id order, so the
global state is bit-identical for any number of processes. Evaluation is spread the same way; rank 0 logs and
checkpoints. Client modules never go through ``fabric.setup`` (DDP would average different clients' gradients).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fedprompt.args import EvalArgs, FederationArgs, TrainArgs
from fedprompt.data.base import ClientSplit
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, state_bytes
from fedprompt.federation.engine import GroupResult, GroupSize, LockstepTrainer, run_groups
from fedprompt.federation.eval_summaries import (SCORES, SUMMARIES, client_scores, evaluation_metrics,
                                                 evaluation_scores, update_evaluation_metrics)
from fedprompt.federation.feed import Feed, LocalPlan, local_epoch_count, local_plan
from fedprompt.federation.privacy import round_privacy
from fedprompt.federation.protocols import ClientModule, MethodSpec
from fedprompt.federation.sampling import derive_seed, drop_clients, place
from fedprompt.federation.scenarios import scenario_summary
from fedprompt.metrics import accuracy_metric, harmonic_mean, summarize
from fedprompt.timing import NoTimer, SectionTimer

State = dict[str, torch.Tensor]

#: the most clients trained together by ``parallel_clients: auto``
AUTO_MAX_PARALLEL = 32


def all_gather_objects(fabric, obj) -> list:
    """Every rank's ``obj`` (a list with one entry per rank; ``[obj]`` on a single process)."""
    if fabric.world_size == 1:
        return [obj]
    out = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def resolve_parallel_clients(setting, num_clients: int, world_size: int) -> GroupSize:
    """K clients per lock-step group. ``auto`` takes every client a rank trains in a round (at most
    :data:`AUTO_MAX_PARALLEL`) and halves K when the device runs out of memory (for the rest of the run)."""
    per_rank = max(1, math.ceil(num_clients / world_size))
    if setting == "auto":
        return GroupSize(min(per_rank, AUTO_MAX_PARALLEL), adaptive=True)
    return GroupSize(max(1, min(int(setting), per_rank)))


@dataclass
class Federation:
    """Everything the round loop needs, built once per process by :mod:`fedprompt.fit`."""

    fabric: object
    method: MethodSpec
    backbone: object
    classnames: list[str]
    aggregator: Aggregator
    clients: list[ClientSplit]
    feed: Feed
    federation: FederationArgs
    train: TrainArgs
    eval: EvalArgs
    seed: int
    states: dict[int, State] = field(default_factory=dict)
    global_state: State = field(default_factory=dict)
    progress: bool = True
    eval_sets: list = field(default_factory=list)
    timer: SectionTimer | None = None
    class_groups: dict | None = None
    """Many / medium / few-shot classes of long-tailed data (:attr:`fedprompt.data.FederatedSplits.class_groups`):
    each client then also reports per-class counts."""
    modules: dict[tuple, ClientModule] = field(default_factory=dict)
    round_epochs: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    """Local epochs trained in each round (its sampled clients that did not drop out), for :meth:`epochs_before`."""
    round_members: dict[int, frozenset] = field(default_factory=dict, init=False, repr=False)
    """The clients trained in each round, for :meth:`epochs_before` (``lr_scope: client``)."""

    def __post_init__(self):
        # lock-step groups hold clients of one class list: no group is larger than the largest set of clients that
        # share one (1 when every client has its own list, as in FedTPG's cross_cls)
        lists: dict[tuple, int] = {}
        for split in self.clients:
            key = tuple(split.classnames or self.classnames)
            lists[key] = lists.get(key, 0) + 1
        self.group = resolve_parallel_clients(self.federation.parallel_clients, max(lists.values()),
                                              self.fabric.world_size)
        self.module_slots = self.group.size  # the slots of every client module (K may shrink, never grow)
        self.trainer = LockstepTrainer(self.fabric, self.feed, self.timer)

    # ---------------------------------------------------------------------------------------------- modules
    @property
    def group_size(self) -> int:
        """The lock-step group size K now (smaller than at the start after an out-of-memory error)."""
        return self.group.size

    def module_for(self, classnames: list[str]) -> ClientModule:
        """A client module (``module_slots`` slots) set to a class list: the federation's module pointed at it, or,
        for methods whose prompts depend on the classes, a module built for it once."""
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

    def chunks(self, ids: list[int]) -> list[list[int]]:
        """``ids`` cut into lock-step groups of at most ``group_size``."""
        return [ids[begin:begin + self.group_size] for begin in range(0, len(ids), self.group_size)]

    def client_classnames(self, cid: int) -> list[str]:
        return self.clients[cid].classnames or self.classnames

    @property
    def client(self) -> ClientModule:
        """The module of the federation's shared class list."""
        return self.module_for(self.classnames)

    # ------------------------------------------------------------------------------------------------ round
    def plan(self, cid: int, round_idx: int) -> LocalPlan:
        """Client ``cid``'s local batches in ``round_idx`` (a function of the run seed, the round and the client)."""
        plan = local_plan(cid, len(self.clients[cid].train), self.train.batch_size, self.train.local_epochs,
                          self.train.local_steps, derive_seed(self.seed, round_idx, cid))
        if self.method.optim.counts_run_epochs:
            plan.epochs_before = self.epochs_before(cid, round_idx)
        return plan

    def sampled(self, round_idx: int) -> list[int]:
        """The ids of the clients that train in ``round_idx`` (the same on every rank; the server's rule:
        :meth:`Aggregator.sample`)."""
        return self.aggregator.sample(len(self.clients), self.federation.fraction, self.seed, round_idx,
                                      everyone=round_idx == 1 and self.federation.all_clients_first_round)

    def dropped(self, sampled: list[int], round_idx: int) -> list[int]:
        """The sampled clients that never report in ``round_idx`` (``federation.drop_rate``; seeded, the same on
        every rank): they do not train and send nothing."""
        return drop_clients(sampled, self.federation.drop_rate, self.seed, round_idx)

    def trained(self, round_idx: int, sampled: list[int] | None = None) -> list[int]:
        """The clients that train in ``round_idx``: the sampled ones (``sampled``, if the caller has them) that do
        not drop out."""
        sampled = self.sampled(round_idx) if sampled is None else sampled
        dropped = self.dropped(sampled, round_idx)
        return [cid for cid in sampled if cid not in dropped]

    def epochs_before(self, cid: int, round_idx: int) -> int:
        """The schedule position of client ``cid``'s local round in ``round_idx`` (a function of the run seed and the
        client sizes only, so it holds on any number of processes and after a resume).

        ``lr_scope: official``: the local epochs trained before it if the trained clients (sampled, not dropped)
        were trained one after another (rounds in order, a round's clients by increasing id), as the official code's
        single trainer does (the position of its one learning-rate scheduler). ``lr_scope: client``: the local epochs
        client ``cid`` itself trained in earlier rounds (its own scheduler, as FedTPG's released code)."""
        def epochs(c: int) -> int:
            return local_epoch_count(len(self.clients[c].train), self.train.batch_size, self.train.local_epochs,
                                     self.train.local_steps)

        if self.method.optim.lr_scope == "client":
            for r in range(1, round_idx):
                if r not in self.round_members:
                    self.round_members[r] = frozenset(self.trained(r))
            return epochs(cid) * sum(cid in self.round_members[r] for r in range(1, round_idx))
        total = 0
        for r in range(1, round_idx):
            if r not in self.round_epochs:
                self.round_epochs[r] = sum(epochs(c) for c in self.trained(r))
            total += self.round_epochs[r]
        return total + sum(epochs(c) for c in self.trained(round_idx) if c < cid)

    def train_clients(self, cids: list[int], round_idx: int, bar=None) -> dict[int, GroupResult]:
        """Train this rank's clients of the round, ``group_size`` at a time."""
        if not self.method.trains:
            return {cid: GroupResult(self.states[cid]) for cid in cids}
        plans = [self.plan(cid, round_idx) for cid in cids]
        return run_groups(self.trainer, self.module_for, lambda p: self.client_classnames(p.cid), plans, self.group,
                          self.states, self.global_state, on_group=bar.update if bar is not None else None)

    def run_round(self, round_idx: int) -> dict:
        """One communication round; returns the metrics row (without evaluation)."""
        start = time.perf_counter()
        fabric = self.fabric
        sampled = self.sampled(round_idx)
        self.aggregator.begin_round(round_idx, self.global_state)
        bytes_down = sum(state_bytes(self.aggregator.download(self.global_state, cid)) for cid in sampled) \
            if self.global_state else 0
        mine = place(self.trained(round_idx, sampled), fabric.global_rank, fabric.world_size)
        bar = tqdm(total=len(mine), desc=f"round {round_idx} clients", leave=False, disable=not self.progress)
        trained = self.train_clients(mine, round_idx, bar)
        bar.close()
        comm = time.perf_counter()
        uploads = {cid: self.aggregator.upload(cid, r.state, round_idx) for cid, r in trained.items()
                   if r.failure is None}
        if self.aggregator.reduce and self.method.communicates:
            summary = self._reduce(trained, uploads, round_idx)
        else:
            summary = self._gather(trained, uploads, round_idx)
        if self.timer is not None:
            self.timer.add("communication", time.perf_counter() - comm)
        losses = [loss for loss in summary["losses"] if not math.isnan(loss)]
        row = {"round": round_idx, "train_loss": sum(losses) / len(losses) if losses else None,
               "clients": sampled, "bytes_up": summary["bytes_up"], "bytes_down": bytes_down,
               "parallel_clients": self.group_size}
        if summary["failed"]:
            row["failed_clients"] = {str(c): why for c, why in summary["failed"].items()}
        if self.federation.drop_rate > 0:
            row["dropped_clients"] = self.dropped(sampled, round_idx)
        row["train_seconds"] = time.perf_counter() - start
        row.update(round_privacy(self, round_idx))  # epsilon (client-level DP), record_epsilon (DP-FPL)
        return row

    def _check_failures(self, failed: dict[int, str], round_idx: int) -> None:
        if failed and self.federation.on_client_failure == "raise":
            details = "; ".join(f"client {c}: {why}" for c, why in failed.items())
            raise FedPromptError(f"round {round_idx}: {details}. The last checkpoint holds the previous round; "
                                 "lower the learning rate or use --federation.on_client_failure skip.")

    def _gather(self, trained: dict[int, GroupResult], uploads: dict[int, State], round_idx: int) -> dict:
        """Every rank gathers every trained client's state and upload; the aggregator runs identically on all."""
        results: dict[int, tuple[GroupResult, State]] = {}
        for part in all_gather_objects(self.fabric, {cid: (r, uploads.get(cid, {})) for cid, r in trained.items()}):
            results.update(part)
        failed = {cid: r.failure for cid, (r, _) in sorted(results.items()) if r.failure}
        self._check_failures(failed, round_idx)
        ok = [cid for cid in sorted(results) if cid not in failed]
        for cid in ok:
            self.states[cid] = results[cid][0].state
        if self.method.communicates and (ok or self.aggregator.aggregates_empty_rounds):
            weights = {cid: len(self.clients[cid].train) for cid in ok}
            self.global_state = self.aggregator.aggregate({cid: results[cid][1] for cid in ok}, weights, round_idx)
            self._distribute()
        return {"losses": [results[cid][0].loss for cid in ok], "failed": failed,
                "bytes_up": sum(state_bytes(results[cid][1]) for cid in ok)}

    def _reduce(self, trained: dict[int, GroupResult], uploads: dict[int, State], round_idx: int) -> dict:
        """For aggregators whose global state is a weighted sum of whole client states (``reduce = True``, e.g.
        FedTPG's 4.2M-parameter generator): each rank sums its own clients' uploads in float64 and one all-reduce
        adds the ranks' sums, so no client state crosses the wire; only losses and failures are gathered."""
        for cid, upload in uploads.items():
            if set(upload) != set(trained[cid].state):
                raise FedPromptError(f"{self.method.name}: the reduce aggregation needs the whole client state to be "
                                     "shared; this method keeps local keys (use the gather path).")
        meta = {cid: (r.loss, r.failure, state_bytes(uploads.get(cid, {}))) for cid, r in trained.items()}
        results: dict[int, tuple] = {}
        for part in all_gather_objects(self.fabric, meta):
            results.update(part)
        failed = {cid: r[1] for cid, r in sorted(results.items()) if r[1]}
        self._check_failures(failed, round_idx)
        ok = [cid for cid in sorted(results) if cid not in failed]
        if ok or self.aggregator.aggregates_empty_rounds:
            weights = {cid: len(self.clients[cid].train) for cid in ok}
            sums = self.aggregator.partial_sum(uploads, weights, self.global_state)  # this rank's successful clients
            if self.fabric.world_size > 1:
                sums = {k: self.fabric.all_reduce(v.to(self.fabric.device), reduce_op="sum").cpu()
                        for k, v in sums.items()}
            self.global_state = self.aggregator.finish(sums, self.global_state)
            self._distribute()
        return {"losses": [results[cid][0] for cid in ok], "failed": failed,
                "bytes_up": sum(results[cid][2] for cid in ok)}

    def _distribute(self) -> None:
        """Every client receives the new global state and merges it into its own."""
        for cid in self.states:
            received = self.aggregator.download(self.global_state, cid)
            self.states[cid] = self.aggregator.apply(self.states[cid], received, cid)

    # ------------------------------------------------------------------------------------------- evaluation
    def _accuracy(self, client: ClientModule, text, slots: torch.Tensor, position: int, name: str) -> float:
        """Accuracy of the client at ``slots[position]`` (its text side precomputed in ``text``) on list ``name``."""
        return self._measure(client, text, slots, position, name, extra=False)[0]

    @torch.no_grad()
    def _measure(self, client: ClientModule, text, slots: torch.Tensor, position: int, name: str,
                 extra: bool = True) -> tuple[float, dict]:
        """Accuracy of the client at ``slots[position]`` on list ``name`` and, with ``extra``, its other scores from
        the same logits (:func:`evaluation_scores`: the calibration tally, per-class counts on long-tailed data)."""
        if not self.feed.lists.get(name):
            return math.nan, {}
        fabric = self.fabric
        metric = accuracy_metric(max(2, len(client.classnames))).to(fabric.device)  # one class: trivially right
        others = evaluation_metrics(len(client.classnames), self.class_groups, fabric.device) if extra else {}
        for batch in self.feed.eval_batches(name, self.eval.batch_size):
            batch = self.feed.finish(fabric.to_device(batch))
            n = batch["label"].shape[0]
            batch.update(slots=slots, owner=torch.full((n,), position, dtype=torch.long, device=fabric.device))
            with fabric.autocast():
                logits = client.predict_logits(batch, text)
            metric.update(logits.float().argmax(1), batch["label"])
            update_evaluation_metrics(others, logits.float(), batch["label"])
        return float(metric.compute()), evaluation_scores(others, len(client.classnames))

    @torch.no_grad()
    def _text(self, client: ClientModule, slots: torch.Tensor):
        with self.fabric.autocast():
            return client.text_for(slots)

    def _load_group(self, classnames: list[str], cids: list[int]) -> tuple[ClientModule, torch.Tensor, object]:
        """The module of ``classnames`` with ``cids`` in its first slots, and their text side (computed once)."""
        client = self.module_for(classnames)
        client.eval()
        client.timer = NoTimer()  # evaluation is timed as a whole
        for slot, cid in enumerate(cids):
            client.load_slot(slot, self.states[cid])
        slots = torch.arange(len(cids), device=self.fabric.device)
        return client, slots, self._text(client, slots)

    def _evaluate_own(self, cids: list[int], test: bool = True) -> dict[int, tuple[float, float]]:
        """(test, validation) accuracy of each client of ``cids`` (one class list) on its own data (test: NaN when
        ``test`` is false, ``eval.mode: global``)."""
        client, slots, text = self._load_group(self.client_classnames(cids[0]), cids)
        out: dict = {}
        for pos, cid in enumerate(cids):
            acc, scores = self._measure(client, text, slots, pos, f"test:{cid}") if test else (math.nan, {})
            out[cid] = (acc, self._accuracy(client, text, slots, pos, f"val:{cid}"))
            out[(SCORES, "test", cid)] = scores
        return out

    def _set_clients(self, eval_set) -> list[int]:
        """The clients scored on an evaluation set: those drawn from its dataset (all clients for a single dataset
        or an unseen one); one client when every client holds the same model."""
        ids = [c.client_id for c in self.clients if c.dataset == eval_set.dataset]
        ids = ids or list(range(len(self.clients)))
        return ids[:1] if self.method.global_model else ids

    def _evaluate_sets(self, ids: list[int] | None = None) -> dict[tuple[str, int], float]:
        """Accuracy of the clients of each evaluation set (base / novel classes, unseen datasets, the global and
        per-domain test splits) on it: this rank's share of them, or (``ids``) those of the clients ``ids``, all on
        this process. Sets with the same class list and clients share one text pass: each client's text features are
        computed once per class list and evaluation."""
        groups: dict[tuple, list] = {}
        for eval_set in self.eval_sets:
            groups.setdefault((tuple(eval_set.classnames), tuple(self._set_clients(eval_set))), []).append(eval_set)
        out = {}
        for (classnames, cids), sets in groups.items():
            if ids is None:
                mine = place(list(cids), self.fabric.global_rank, self.fabric.world_size)
            else:
                mine = [cid for cid in cids if cid in ids]
            for chunk in self.chunks(mine):
                client, slots, text = self._load_group(list(classnames), chunk)
                for eval_set in sets:
                    for pos, cid in enumerate(chunk):
                        acc, scores = self._measure(client, text, slots, pos, f"test:{eval_set.name}")
                        out[(eval_set.name, cid)] = acc
                        out[(SCORES, f"set/{eval_set.name}", cid)] = scores
        return out

    def _evaluate_own_tests(self, ids: list[int], bar=None) -> dict:
        """``{cid: (test_acc, val_acc)}`` of the clients ``ids`` on their own data (test accuracy only in the
        personal views of ``eval.mode``), grouped by class list."""
        groups: dict[tuple, list[int]] = {}
        for cid in ids:
            groups.setdefault(tuple(self.client_classnames(cid)), []).append(cid)
        out: dict = {}
        for members in groups.values():
            for chunk in self.chunks(members):
                out.update(self._evaluate_own(chunk, test=self.eval.mode != "global"))
                if bar is not None:
                    bar.update(len(chunk))
        return out

    def evaluate_all(self) -> dict:
        """Every client's accuracy on its own test data (and on the evaluation sets), spread over ranks; returns the
        summary metrics."""
        start = time.perf_counter()
        mine = place(list(range(len(self.clients))), self.fabric.global_rank, self.fabric.world_size)
        bar = tqdm(total=len(mine), desc="evaluating", leave=False, disable=not self.progress)
        local = self._evaluate_own_tests(mine, bar)
        bar.close()
        local.update(self._evaluate_sets())
        results: dict = {}
        for part in all_gather_objects(self.fabric, local):
            results.update(part)
        out = self.summarize_evaluation(results)
        if self.timer is not None:
            self.timer.add("evaluation", time.perf_counter() - start)
        return out

    # -------------------------------------------------- pieces for runtimes that evaluate each client where it lives
    def evaluate_clients(self, ids: list[int]) -> dict:
        """The evaluation results of the clients ``ids`` from their states in :attr:`states`, on this process:
        ``{cid: (test_acc, val_acc)}`` and ``{(set name, cid): acc}`` for each evaluation set a client of ``ids`` is
        scored on. Every client's results together make :meth:`summarize_evaluation`'s input; for runtimes where each
        client lives on its own node (:mod:`fedprompt.flower`). :meth:`evaluate_all` does the same for every client,
        spread over the ranks."""
        out = self._evaluate_own_tests(ids)
        out.update(self._evaluate_sets(ids))
        return out

    def summarize_evaluation(self, results: dict) -> dict:
        """The round's evaluation metrics (what :meth:`evaluate_all` returns) from every client's results (the
        entries of :meth:`evaluate_clients`; a client missing from ``results`` counts as not evaluated, NaN)."""
        ids = list(range(len(self.clients)))
        nan = (math.nan, math.nan)
        results = {**{cid: nan for cid in ids}, **results}
        for eval_set in self.eval_sets:
            for cid in self._set_clients(eval_set):
                results.setdefault((eval_set.name, cid), math.nan)
        out = self._personal_summary(results, ids) if self.eval.mode != "global" else {}
        val = [results[cid][1] for cid in ids if not math.isnan(results[cid][1])]
        if val:
            out["val_acc"] = sum(val) / len(val)
        out.update(self._set_summary(results, out.get("local_acc", out.get("own_classes_acc"))))
        out.update(self._metric_summaries(results, out))
        return out

    def set_clients(self, eval_set) -> list[int]:
        """The clients scored on an evaluation set (see :meth:`_set_clients`)."""
        return self._set_clients(eval_set)

    def _metric_summaries(self, results: dict, row: dict) -> dict:
        """Calibration, fairness, both HMs, the held-out domain and the long-tailed groups
        (:mod:`fedprompt.federation.eval_summaries`), from every client's scores in ``results``."""
        scores = client_scores(results)
        out: dict = {}
        for summary in SUMMARIES:
            out.update(summary(self, scores, {**row, **out}))
        return out

    def _personal_summary(self, results: dict, ids: list[int]) -> dict:
        """``local_acc`` (each client on its own test data, mean over clients), its std, ``client_acc`` and, for a
        global model, ``global_acc`` over the union of the clients' test data (``own_classes_acc`` instead for
        clients with their own class lists)."""
        accs = {cid: results[cid][0] for cid in ids}
        counts = {cid: len(self.clients[cid].test) for cid in ids}
        valid = {cid: a for cid, a in accs.items() if not math.isnan(a)}
        out = summarize(valid, counts, self.method.global_model)
        out["client_acc"] = [accs[cid] for cid in ids]
        if any(c.classnames for c in self.clients):
            out = self._own_classes(out)
        return out

    def _own_classes(self, out: dict) -> dict:
        """Clients with their own class lists (FedTPG's cross_cls) are scored among their own classes, an easier
        task than the label space of a dataset: reported as ``own_classes_acc`` (mean over datasets of the mean over
        their clients, as FedTPG reports Local), never as ``local_acc``, and without ``global_acc``."""
        by_dataset: dict[str, list[float]] = {}
        for cid, acc in enumerate(out["client_acc"]):
            if not math.isnan(acc):
                by_dataset.setdefault(self.clients[cid].dataset, []).append(acc)
        means = [sum(v) / len(v) for v in by_dataset.values()]
        values = torch.tensor([a for v in by_dataset.values() for a in v], dtype=torch.float64)
        rest = {k: v for k, v in out.items() if k not in ("local_acc", "local_acc_std", "global_acc")}
        return {"own_classes_acc": sum(means) / len(means) if means else math.nan,
                "own_classes_acc_std": float(values.std(unbiased=False)) if len(values) else math.nan, **rest}

    def _set_summary(self, results: dict, local_acc: float) -> dict:
        """``base_acc`` / ``novel_acc`` (mean over datasets of the mean over their clients), ``hm``, ``cm``,
        ``unseen_acc``; per-client base/novel accuracies for a single dataset; ``set_acc`` per evaluation set when
        there are several datasets."""
        if not self.eval_sets:
            return {}
        per_set = {}
        for eval_set in self.eval_sets:
            values = [results[(eval_set.name, cid)] for cid in self._set_clients(eval_set)]
            per_set[eval_set.name] = sum(values) / len(values)
        sets = [e for e in self.eval_sets if e.split in ("base", "novel", "all")]  # the data's own protocol sets
        out = {}
        base = [per_set[e.name] for e in sets if e.split == "base" and e.seen]
        novel = [per_set[e.name] for e in sets if e.split == "novel" and e.seen]
        if base and novel:
            out["base_acc"], out["novel_acc"] = sum(base) / len(base), sum(novel) / len(novel)
            out["hm"] = harmonic_mean(out["base_acc"], out["novel_acc"])
            if local_acc is not None:
                out["cm"] = (local_acc + out["hm"]) / 2
        unseen = [per_set[e.name] for e in sets if not e.seen]
        if unseen:
            out["unseen_acc"] = sum(unseen) / len(unseen)
        if len(base) == 1 and len(novel) == 1 and not unseen:
            for split in ("base", "novel"):
                name = next(e.name for e in sets if e.split == split)
                out[f"client_{split}_acc"] = [results.get((name, cid), per_set[name])
                                              for cid in range(len(self.clients))]
        elif sets:
            out["set_acc"] = {e.name: per_set[e.name] for e in sets}
        out.update(scenario_summary(self.eval_sets, per_set, results, self._set_clients, local_acc))
        return out

    def initial_states(self) -> None:
        """Every client starts from the same initial prompt state (the server's initialisation), as the method
        makes it its own (:meth:`fedprompt.methods.Method.initial_client_state`: e.g. FedPHA's local prompt lengths)."""
        init = self.client.slot_state(0)
        self.states = {cid: self.method.initial_client_state(cid, {k: v.clone() for k, v in init.items()})
                       for cid in range(len(self.clients))}
        if self.method.communicates:
            self.global_state = self.aggregator.upload(-1, init, 0)
