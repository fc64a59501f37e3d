"""The evaluator: every client scored on its own data and on the evaluation sets, and the round's summary of it.

Evaluation has two halves, so that it runs wherever the clients live:

- **scoring** (:meth:`Evaluator.score`) runs where the clients' states are (every Fabric rank for its share of the
  clients; a Flower node for its one client): each client's prompts on its own test and validation data and on the
  evaluation sets it is scored on (base / novel classes, unseen datasets, the global and per-domain test splits),
  measured by every :data:`CLIENT_METRICS` entry in one pass over the logits. A client's scores are a flat
  ``{"<metric>:<list>": value}`` dict (lists: ``test``, ``val``, ``set/<set name>``), which any transport can
  carry (a Flower ``MetricRecord`` as it is).
- **summarising** (:meth:`Evaluator.summarize`) runs on the server from every client's scores: ``local_acc`` and its
  std, ``client_acc``, ``global_acc``, ``val_acc``, base / novel / HM / CM, the scenario metrics
  (:mod:`fedprompt.federation.scenarios`), then every :data:`ROW_SUMMARIES` entry.

A new per-client metric is one :class:`ClientMetric` in :data:`CLIENT_METRICS`; a new row entry computed from the
clients' scores is one function in :data:`ROW_SUMMARIES`. Both runtimes then report it: they share this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fedprompt.calibration import CalibrationTally
from fedprompt.federation.eval_summaries import CALIBRATION, COUNTS, SUMMARIES
from fedprompt.federation.ood_eval import OODDetection, ood_row
from fedprompt.federation.scenarios import scenario_summary
from fedprompt.metrics import accuracy_metric, class_counts, class_counts_metric, harmonic_mean, summarize
from fedprompt.timing import NoTimer

Scores = dict[str, float]


@dataclass(frozen=True)
class ClientMetric:
    """A metric measured on every sample list a client is scored on, from its logits and the labels.

    Attributes:
        name: the key's prefix (``acc`` gives ``acc:test``, ``acc:val``, ``acc:set/<name>``).
        build: a fresh torchmetrics metric for a list of ``num_classes`` classes.
        inputs: what the metric is updated with, from the float logits ``[n, C]`` (default: the predicted class).
        value: the score from the metric's ``compute()`` and the number of classes: a float (default), or a list of
            floats (a tally or counts that add up over clients; a Flower ``MetricRecord`` carries it as it is).
            A list-valued metric has no score on an empty sample list.
    """

    name: str
    build: Callable[[int], object]
    inputs: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits.argmax(1)
    value: Callable[[torch.Tensor, int], float | list] = lambda result, classes: float(result)

    @property
    def listed(self) -> bool:
        """Whether the score is a list of floats (this metric's ``value`` is not the default)."""
        return self.value is not ClientMetric.__dataclass_fields__["value"].default


#: the calibration tally of the top-1 softmax confidences (ECE per client and over clients: eval_summaries)
CALIBRATION_METRIC = ClientMetric(CALIBRATION, lambda classes: CalibrationTally(), inputs=lambda logits: logits,
                                  value=lambda result, classes: result.flatten().tolist())
#: per-class (correct, total) counts, measured on long-tailed data (many / medium / few-shot accuracy)
COUNTS_METRIC = ClientMetric(COUNTS, class_counts_metric, value=lambda result, classes: class_counts(result, classes))

#: what the evaluator measures on every sample list (one pass over the logits for all of them)
CLIENT_METRICS: tuple[ClientMetric, ...] = (ClientMetric("acc", lambda classes: accuracy_metric(max(2, classes))),
                                            CALIBRATION_METRIC)

#: row entries computed from every client's scores after the built-in summary: ``f(evaluator, scores, row) -> dict``
#: (calibration, fairness, both HMs, the held-out domain, the long-tailed groups: eval_summaries; OOD detection)
ROW_SUMMARIES: list[Callable] = [*SUMMARIES, ood_row]


def key(metric: str, name: str) -> str:
    """The score key of ``metric`` on sample list ``name`` (``test``, ``val`` or ``set/<set name>``)."""
    return f"{metric}:{name}"


class Evaluator:
    """Scores clients and summarises a round's evaluation.

    Args:
        clients: every client's split (``name``, ``dataset``, ``classnames``, ``train``, ``test``).
        classnames: the federation's class list.
        eval_args: the evaluation settings (``mode``, ``batch_size``, ``every``).
        eval_sets: the evaluation sets beyond each client's own data.
        global_model: whether every client holds the same model (the method's ``global_model``).
        class_groups: the many / medium / few-shot classes of long-tailed data
            (:attr:`fedprompt.data.FederatedSplits.class_groups`): clients then also report per-class counts.
        detection: OOD detection (``eval.ood``), measured with each client's own data
            (:mod:`fedprompt.federation.ood_eval`).
    """

    def __init__(self, clients: list, classnames: list[str], eval_args, eval_sets: list, global_model: bool,
                 class_groups: dict | None = None, detection: OODDetection | None = None):
        self.clients = clients
        self.classnames = classnames
        self.eval = eval_args
        self.eval_sets = list(eval_sets)
        self.global_model = global_model
        self.class_groups = class_groups
        self.metrics = CLIENT_METRICS + ((COUNTS_METRIC,) if class_groups else ())
        self.detection = detection

    def scheduled(self, round_idx: int, rounds: int) -> bool:
        """Whether ``round_idx`` is evaluated (every ``eval.every`` rounds, and the last round)."""
        return round_idx % self.eval.every == 0 or round_idx == rounds

    def set_clients(self, eval_set) -> list[int]:
        """The clients scored on an evaluation set: those drawn from its dataset (all clients for a single dataset
        or an unseen one); one client when every client holds the same model."""
        ids = [c.client_id for c in self.clients if c.dataset == eval_set.dataset]
        ids = ids or list(range(len(self.clients)))
        return ids[:1] if self.global_model else ids

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, pool, own: list[int], pick: Callable[[list[int]], list[int]], bar=None) -> dict[int, Scores]:
        """The scores of the clients of ``pool`` on this process: those of ``own`` on their own data (test scores
        only in the personal views of ``eval.mode``), and on each evaluation set the clients ``pick`` takes of those
        scored on it. Sets with the same class list and clients share one text pass."""
        out: dict[int, Scores] = {}
        by_classes: dict[tuple, list[int]] = {}
        for cid in own:
            by_classes.setdefault(tuple(pool.classnames_of(cid)), []).append(cid)
        lists = ["test", "val"] if self.eval.mode != "global" else ["val"]
        for members in by_classes.values():
            for chunk in pool.chunks(members):
                self._score_chunk(pool, list(pool.classnames_of(chunk[0])), chunk,
                                  {name: name for name in lists}, out, detect=True)
                if bar is not None:
                    bar.update(len(chunk))
        groups: dict[tuple, list] = {}
        for eval_set in self.eval_sets:
            groups.setdefault((tuple(eval_set.classnames), tuple(self.set_clients(eval_set))), []).append(eval_set)
        for (classnames, cids), sets in groups.items():
            for chunk in pool.chunks(pick(list(cids))):
                self._score_chunk(pool, list(classnames), chunk, {f"set/{s.name}": f"test:{s.name}" for s in sets},
                                  out)
        return out

    def _score_chunk(self, pool, classnames: list[str], cids: list[int], lists: dict[str, str], out: dict,
                     detect: bool = False) -> None:
        """Score the clients ``cids`` (one lock-step group) on every sample list of ``lists`` (score name -> the
        feed's list name; ``test``/``val`` name the clients' own), and (``detect``) their OOD detection."""
        client = pool.module_for(classnames)
        client.eval()
        client.timer = NoTimer()  # evaluation is timed as a whole
        for slot, cid in enumerate(cids):
            client.load_slot(slot, pool.states[cid])
        slots = torch.arange(len(cids), device=pool.fabric.device)
        text = self._text(pool.fabric, client, slots)
        for pos, cid in enumerate(cids):
            for name, feed_list in lists.items():
                feed_list = f"{feed_list}:{cid}" if feed_list in ("test", "val") else feed_list
                scores = self._measure(pool, client, text, slots, pos, feed_list)
                out.setdefault(cid, {}).update({key(m, name): v for m, v in scores.items()})
        if detect and self.detection is not None:
            for cid, scores in self.detection.client_scores(self, pool, client, text, slots, cids).items():
                out.setdefault(cid, {}).update(scores)

    @staticmethod
    @torch.no_grad()
    def _text(fabric, client, slots: torch.Tensor):
        with fabric.autocast():
            return client.text_for(slots)

    @torch.no_grad()
    def _measure(self, pool, client, text, slots: torch.Tensor, position: int, name: str) -> dict[str, float]:
        """Every value of :attr:`metrics` (:data:`CLIENT_METRICS`, and the counts on long-tailed data) of the client
        at ``slots[position]`` (its text side precomputed in ``text``) on list ``name`` (NaN for an empty list)."""
        if not pool.feed.lists.get(name):
            return {m.name: math.nan for m in self.metrics if not m.listed}
        count = len(client.classnames)
        metrics = [(m, m.build(count).to(pool.fabric.device)) for m in self.metrics]
        for logits, label in self.eval_logits(pool, client, text, slots, position, name):
            for spec, metric in metrics:  # columns past the classes: a model's own negative labels (FOCoOp)
                metric.update(spec.inputs(logits[:, :count].float()), label)
        return {spec.name: spec.value(metric.compute(), count) for spec, metric in metrics}

    @torch.no_grad()
    def eval_logits(self, pool, client, text, slots: torch.Tensor, position: int, name: str):
        """``(logits, labels)`` of each evaluation batch of feed list ``name`` for the client at ``slots[position]``
        (its text side precomputed in ``text``)."""
        fabric = pool.fabric
        for batch in pool.feed.eval_batches(name, self.eval.batch_size):
            batch = pool.feed.finish(fabric.to_device(batch))
            n = batch["label"].shape[0]
            batch.update(slots=slots, owner=torch.full((n,), position, dtype=torch.long, device=fabric.device))
            with fabric.autocast():
                yield client.predict_logits(batch, text), batch["label"]

    # ------------------------------------------------------------------------------------------ summarising
    def summarize(self, scores: dict[int, Scores]) -> dict:
        """The round's evaluation metrics from every client's scores (a client or a score missing from ``scores``
        counts as not evaluated: NaN)."""
        ids = list(range(len(self.clients)))
        got = {cid: scores.get(cid, {}) for cid in ids}
        acc = {cid: (got[cid].get("acc:test", math.nan), got[cid].get("acc:val", math.nan)) for cid in ids}
        out = self._personal_summary(acc, ids) if self.eval.mode != "global" else {}
        val = [acc[cid][1] for cid in ids if not math.isnan(acc[cid][1])]
        if val:
            out["val_acc"] = sum(val) / len(val)
        out.update(self._set_summary(got, out.get("local_acc", out.get("own_classes_acc"))))
        for summary in ROW_SUMMARIES:
            out.update(summary(self, got, out))
        return out

    def _personal_summary(self, acc: dict, ids: list[int]) -> dict:
        """``local_acc`` (each client on its own test data, mean over clients), its std, ``client_acc`` and, for a
        global model, ``global_acc`` over the union of the clients' test data (``own_classes_acc`` instead for
        clients with their own class lists)."""
        accs = {cid: acc[cid][0] for cid in ids}
        counts = {cid: len(self.clients[cid].test) for cid in ids}
        valid = {cid: a for cid, a in accs.items() if not math.isnan(a)}
        out = summarize(valid, counts, self.global_model)
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

    def _set_accuracies(self, got: dict[int, Scores]) -> tuple[dict, dict]:
        """``{(set name, cid): accuracy}`` of every client scored on a set (NaN when missing), and each set's mean
        over its clients."""
        results, per_set = {}, {}
        for eval_set in self.eval_sets:
            values = []
            for cid in self.set_clients(eval_set):
                results[(eval_set.name, cid)] = got[cid].get(key("acc", f"set/{eval_set.name}"), math.nan)
                values.append(results[(eval_set.name, cid)])
            per_set[eval_set.name] = sum(values) / len(values)
        return results, per_set

    def _set_summary(self, got: dict[int, Scores], local_acc: float) -> dict:
        """``base_acc`` / ``novel_acc`` (mean over datasets of the mean over their clients), ``hm``, ``cm``,
        ``unseen_acc``; per-client base/novel accuracies for a single dataset; ``set_acc`` per evaluation set when
        there are several datasets."""
        if not self.eval_sets:
            return {}
        results, per_set = self._set_accuracies(got)
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
        out.update(scenario_summary(self.eval_sets, per_set, results, self.set_clients, local_acc))
        return out
