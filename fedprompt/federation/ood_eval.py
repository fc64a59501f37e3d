"""OOD detection in the evaluation (``eval.ood``), for every method: each client's model scores its own test images
(in-distribution) and every OOD set (:func:`fedprompt.data.scenarios.ood_sets`); each score's AUROC and FPR at 95 %
TPR (:mod:`fedprompt.ood`) are computed where the client is scored (:meth:`OODDetection.client_scores`, called by
:class:`~fedprompt.federation.evaluator.Evaluator` with the client's own data), so only these numbers travel with
its other scores (Fabric's gather, Flower's metric records), never logits or per-image scores.

A client's scores gain ``ood:<set>/<score>/<auroc|fpr95>``; :func:`ood_row` (an entry of the evaluator's
``ROW_SUMMARIES``) turns every client's into the row: ``ood/<set>/<score>/auroc`` and ``.../fpr95`` (the mean over
the clients scored), ``client_ood/<set>/<score>/auroc`` and ``.../fpr95`` (one value per client, NaN where not
scored) and, with several OOD sets, ``ood/mean/<score>/...`` (the mean over sets).

NegLabel's negative columns are the model's own when its logits have more columns than classes (FOCoOp's OOD
prompts); otherwise the words mined from ``eval.ood_negatives`` are scored as a class list of their own through the
method's prompts (a second pass over the same images; methods whose prompts are class-specific are refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedprompt.errors import FedPromptError
from fedprompt.ood import detection_metrics, mine_negative_labels, ood_scores, read_word_lists

METRICS = ("auroc", "fpr95")


def result_key(set_name: str, score: str, metric: str) -> str:
    """A client's OOD score key (``ood:<set>/<score>/<metric>``; ``set_name`` without its ``ood/`` prefix)."""
    return f"ood:{set_name}/{score}/{metric}"


def row_key(set_name: str, score: str, metric: str) -> str:
    """The row key of the mean over clients (``ood/<set>/<score>/<metric>``)."""
    return f"ood/{set_name}/{score}/{metric}"


@dataclass
class OODDetection:
    """The OOD detection of a run: its OOD sets (:class:`fedprompt.data.EvalSet`, split ``ood``), scores and
    negative labels (``None``: none mined; the model's own columns, if any, serve NegLabel)."""

    sets: list
    scores: tuple[str, ...]
    logit_scale: float
    negatives: list[str] | None = None
    all_columns: bool = False
    names: list[str] = field(init=False)

    def __post_init__(self):
        self.names = [s.name.removeprefix("ood/") for s in self.sets]

    def lists(self, cid: int) -> list[tuple[str, str | None]]:
        """The feed lists of client ``cid``'s detection: its own test data, then each OOD set (with its name)."""
        return [(f"test:{cid}", None)] + [(f"test:{s.name}", name) for s, name in zip(self.sets, self.names)]

    def client_scores(self, evaluator, pool, client, text, slots: torch.Tensor, cids: list[int]) -> dict:
        """``{cid: {score key: value}}`` of the clients ``cids`` loaded in ``client``'s first slots (``text``: their
        text side on the class list the module is set to)."""
        classnames = list(client.classnames)
        logits = {(pos, name): _logits(evaluator, pool, client, text, slots, pos, name)
                  for pos, cid in enumerate(cids) for name, _ in self.lists(cid)}
        negative = {}
        if "neglabel" in self.scores and self.negatives is not None \
                and any(v.shape[1] == len(classnames) for v in logits.values()):
            words = pool.module_for(self.negatives)  # the same module (switchable), pointed at the words
            words_text = evaluator._text(pool.fabric, words, slots)
            negative = {k: _logits(evaluator, pool, words, words_text, slots, *k) for k in logits}
            pool.module_for(classnames)
        out = {}
        for pos, cid in enumerate(cids):
            per_list = {set_name: ood_scores(logits[(pos, name)], len(classnames), self.scores, self.logit_scale,
                                             negative.get((pos, name)), self.all_columns)
                        for name, set_name in self.lists(cid)}
            inside = per_list.pop(None)
            out[cid] = {result_key(set_name, score, metric): value
                        for set_name, scores in per_list.items() for score in self.scores
                        for metric, value in detection_metrics(inside[score], scores[score]).items()}
        return out


@torch.no_grad()
def _logits(evaluator, pool, client, text, slots: torch.Tensor, position: int, name: str) -> torch.Tensor:
    """The logits ``[n, C (+ M)]`` (float32, CPU) of the client at ``slots[position]`` on feed list ``name``."""
    parts = [logits.float().cpu() for logits, _ in evaluator.eval_logits(pool, client, text, slots, position, name)]
    return torch.cat(parts) if parts else torch.zeros(0, len(client.classnames))


def build_detection(eval_args, ood_sets: list, backbone, classnames: list[str], client, method) -> OODDetection | None:
    """The run's OOD detection (``None`` without OOD sets), checked before anything is written: NegLabel needs
    negative labels (the method's own or ``eval.ood_negatives``, mined here), and mined ones a method whose prompts
    do not depend on the classes."""
    if not ood_sets:
        return None
    scores = tuple(dict.fromkeys(eval_args.ood_scores))
    if not scores:
        raise FedPromptError("eval.ood_scores is empty: name at least one of msp, energy, mcm, neglabel.")
    negatives = None
    own = getattr(method, "own_negative_labels", False)
    if "neglabel" in scores and not own:
        if not eval_args.ood_negatives:
            raise FedPromptError(f"eval.ood_scores: neglabel needs negative labels; {method.name} has none of its own, "
                                 "so set eval.ood_negatives (WordNet word lists, e.g. FOCoOp's src/txtfiles).")
        if not client.switchable_classes:
            raise FedPromptError(f"eval.ood_scores: neglabel scores the negative words through the method's prompts, "
                                 f"but {method.name} here has class-specific prompts; drop neglabel.")
        negatives = mined_negatives(eval_args, backbone, classnames)
    return OODDetection(list(ood_sets), scores, backbone.logit_scale, negatives, eval_args.ood_all_columns)


def mined_negatives(eval_args, backbone, classnames: list[str]) -> list[str]:
    """``eval.ood_negative_count`` words of ``eval.ood_negatives`` least similar to ``classnames`` (the frozen text
    tower's features)."""
    import torch.nn.functional as F

    adjectives, nouns = read_word_lists(eval_args.ood_negatives)

    def encode(sentences):
        return F.normalize(backbone.encode_text(sentences).float(), dim=-1)

    return mine_negative_labels(encode, list(classnames), adjectives, nouns, eval_args.ood_negative_count)


def ood_row(evaluator, scores: dict, row: dict) -> dict:
    """The row entries of OOD detection from every client's scores (module docstring; nothing without
    ``eval.ood``)."""
    detection = evaluator.detection
    if detection is None:
        return {}
    out, per_set = {}, {}
    for set_name in detection.names:
        for score in detection.scores:
            for metric in METRICS:
                key = result_key(set_name, score, metric)
                values = [scores.get(cid, {}).get(key, math.nan) for cid in range(len(evaluator.clients))]
                kept = [v for v in values if not math.isnan(v)]
                mean = out[row_key(set_name, score, metric)] = sum(kept) / len(kept) if kept else math.nan
                out["client_" + row_key(set_name, score, metric)] = values
                per_set.setdefault((score, metric), []).append(mean)
    if len(detection.names) > 1:
        for (score, metric), values in per_set.items():
            out[row_key("mean", score, metric)] = sum(values) / len(values)
    return out
