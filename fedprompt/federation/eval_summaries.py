"""The row entries of the evaluation beyond accuracy, computed on the server from every client's scores: calibration,
fairness across clients, both HMs, leave-one-domain-out targets and long-tailed groups.

Each client's scores hold, per sample list (``test``, ``val``, ``set/<set name>``), its accuracy (``acc:<list>``), its
calibration tally (``calibration:<list>``, :class:`fedprompt.calibration.CalibrationTally`) and, on long-tailed data,
its per-class (correct, total) counts (``counts:<list>``). The functions here turn them into the row's keys
(docs/evaluation-metrics.md); each takes the evaluator (its clients, evaluation sets, settings), the scores and the
row summarised so far, and returns the entries to add. Every runtime calls them through the evaluator, so the rows of
``fedprompt fit`` and ``--runtime flower`` hold the same keys and values.
"""

from __future__ import annotations

import math

from fedprompt.calibration import add_tallies, expected_calibration_error
from fedprompt.metrics import both_hms, fairness_keys, group_accuracy

#: score names of the calibration tally and of the per-class counts
CALIBRATION, COUNTS = "calibration", "counts"
#: the evaluation sets whose calibration and long-tailed groups the row reports, by split: the row keys' prefix
SPLIT_PREFIX = {"global": "global_", "base": "base_", "novel": "novel_", "target": "target_"}
#: accuracies with a per-client list in the row: their fairness keys
CLIENT_LISTS = (("local_acc", "client_acc"), ("own_classes_acc", "client_acc"), ("base_acc", "client_base_acc"),
                ("novel_acc", "client_novel_acc"), ("global_acc", "client_global_acc"))
#: summary.json entries these functions add (besides the fairness keys ``<acc>_std`` / ``_worst`` / ``_worst10``)
SUMMARY_KEYS = ("ece", "client_ece", "calibration", "global_ece", "global_calibration", "base_ece", "novel_ece",
                "target_acc", "target_ece", "hm_base_novel", "hm_local_base_novel", "many_acc", "medium_acc",
                "few_acc", "global_many_acc", "global_medium_acc", "global_few_acc")
FAIRNESS_SUFFIXES = ("_std", "_worst", "_worst10")


#: the accuracies whose spread over clients the row holds
FAIRNESS_OF = tuple(dict.fromkeys(acc for acc, _ in CLIENT_LISTS)) + ("target_acc",)


def is_summary_key(key: str) -> bool:
    """Whether ``key`` is one of the entries these functions add (what run summaries keep)."""
    return key in SUMMARY_KEYS or any(key == acc + suffix for acc in FAIRNESS_OF for suffix in FAIRNESS_SUFFIXES)


def _score(scores: dict, cid: int, metric: str, name: str):
    """A client's score; ``None`` when it is missing (a list-valued score: also when it is not a list)."""
    value = (scores.get(cid) or {}).get(f"{metric}:{name}")
    return value if metric == "acc" or isinstance(value, list) else None


def _set_scores(evaluator, scores: dict, metric: str, split: str) -> list:
    """``metric``'s score of every client scored on every set of ``split`` (the data's own seen sets for base and
    novel), ``None`` where missing."""
    sets = [e for e in evaluator.eval_sets if e.split == split and (e.seen or split in ("global", "target"))]
    return [_score(scores, cid, metric, f"set/{e.name}") for e in sets for cid in evaluator.set_clients(e)]


def _ece(tallies: list) -> float | None:
    total = add_tallies(tallies)
    return None if total is None or float(total[0].sum()) == 0 else expected_calibration_error(total)


def calibration_summary(evaluator, scores: dict, row: dict) -> dict:
    """``ece`` (every client's own test samples together), ``client_ece``, ``calibration`` (their tally), and the ECE of
    the global, base, novel and target sets (``global_ece``, ``global_calibration``, ...)."""
    out: dict = {}
    ids = range(len(evaluator.clients))
    if evaluator.eval.mode != "global":
        own = [_score(scores, cid, CALIBRATION, "test") for cid in ids]
        if _ece(own) is not None:
            out["ece"] = _ece(own)
            out["client_ece"] = [math.nan if _ece([t]) is None else _ece([t]) for t in own]
            out["calibration"] = add_tallies(own).flatten().tolist()
    for split, prefix in SPLIT_PREFIX.items():
        tallies = _set_scores(evaluator, scores, CALIBRATION, split)
        if _ece(tallies) is not None:
            out[f"{prefix}ece"] = _ece(tallies)
            if split == "global":
                out["global_calibration"] = add_tallies(tallies).flatten().tolist()
    return out


def target_summary(evaluator, scores: dict, row: dict) -> dict:
    """Leave-one-domain-out: ``target_acc`` (the mean over the clients scored on the held-out domain; clients not
    scored left out) and, when several clients are scored (methods with personal parts), its spread over them."""
    values = [v for v in _set_scores(evaluator, scores, "acc", "target") if v is not None and not math.isnan(v)]
    if not values:
        return {}
    spread = fairness_keys("target_acc", values) if len(values) > 1 else {}
    return {"target_acc": sum(values) / len(values), **spread}


def fairness_summary(evaluator, scores: dict, row: dict) -> dict:
    """The spread over clients of every accuracy with a per-client list in the row (``<acc>_std``, ``_worst``,
    ``_worst10``); entries the row already has (``local_acc_std``) are kept."""
    out: dict = {}
    for acc, listed in CLIENT_LISTS:
        if acc in row and isinstance(row.get(listed), list):
            out.update({k: v for k, v in fairness_keys(acc, row[listed]).items() if k not in row})
    return out


def hm_summary(evaluator, scores: dict, row: dict) -> dict:
    """Both HMs under their own names (``hm`` and ``cm`` keep theirs): ``hm_base_novel``, ``hm_local_base_novel``."""
    if "base_acc" not in row or "novel_acc" not in row:
        return {}
    return both_hms(row.get("local_acc", row.get("own_classes_acc")), row["base_acc"], row["novel_acc"])


def _group_keys(counts: list, groups: dict, prefix: str) -> dict:
    counts = [c for c in counts if c is not None]
    if not counts:
        return {}
    total = [sum(values) for values in zip(*counts)]
    half = len(total) // 2
    accs = group_accuracy(total[:half], total[half:], groups)
    return {f"{prefix}{group}_acc": value for group, value in accs.items()}


def long_tail_summary(evaluator, scores: dict, row: dict) -> dict:
    """Long-tailed data (``class_groups``): ``many_acc`` / ``medium_acc`` / ``few_acc`` from every client's own test
    counts added up, and ``global_many_acc`` ... from the global sets'."""
    groups = getattr(evaluator, "class_groups", None)
    if not groups:
        return {}
    out: dict = {}
    if evaluator.eval.mode != "global":
        out.update(_group_keys([_score(scores, cid, COUNTS, "test") for cid in range(len(evaluator.clients))],
                               groups, ""))
    out.update(_group_keys(_set_scores(evaluator, scores, COUNTS, "global"), groups, "global_"))
    return out


#: the row summaries, in the order they run (fairness reads the per-client lists the built-in summary wrote)
SUMMARIES = (target_summary, fairness_summary, hm_summary, calibration_summary, long_tail_summary)
