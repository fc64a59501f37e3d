"""The metrics of the evaluation scenarios, from the per-set accuracies the round loop measured.

- ``unseen/<target>``: each dataset the federation never trains on (cross-dataset / cross-domain targets of
  :class:`fedprompt.data.Transfer`, ``unseen`` datasets of :class:`fedprompt.data.Combined`); their mean is the
  loop's ``unseen_acc``.
- ``global_acc``: ``eval.mode: global`` / ``dual``: the aggregated prompt on each training dataset's whole test split
  (mean over datasets); for methods whose clients keep personal parts, each client's prompt on it, averaged over
  clients, and ``client_global_acc`` lists the clients' accuracies.
- ``dual_hm``: ``eval.mode: dual``: the harmonic mean of the personal (``local_acc``) and the global accuracy.
- ``domain/<domain>`` and ``multidomain_acc``: ``eval.domains``: every domain's test split, scored as the global one,
  and the test-size-weighted mean over domains (FLiP's ``multidomain``).
"""

from __future__ import annotations

from typing import Callable

from fedprompt.metrics import harmonic_mean


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def scenario_summary(eval_sets: list, per_set: dict[str, float], results: dict,
                     set_clients: Callable[[object], list[int]], local_acc: float | None) -> dict:
    """The scenario metrics (module docstring) of one evaluation.

    Args:
        eval_sets: the evaluation sets (:class:`fedprompt.data.EvalSet`).
        per_set: each set's accuracy (mean over the clients scored on it).
        results: ``(set name, client id) -> accuracy``.
        set_clients: the clients scored on a set.
        local_acc: the personal accuracy (``local_acc`` or ``own_classes_acc``), ``None`` in ``eval.mode: global``.
    """
    out: dict = {}
    for item in eval_sets:
        if not item.seen and item.split != "target":  # a held-out domain is target_acc (eval_summaries)
            out[f"unseen/{item.dataset}"] = per_set[item.name]
    global_sets = [e for e in eval_sets if e.split == "global"]
    if global_sets:
        out["global_acc"] = _mean([per_set[e.name] for e in global_sets])
        if len(global_sets) == 1 and len(set_clients(global_sets[0])) > 1:
            out["client_global_acc"] = [results[(global_sets[0].name, cid)] for cid in set_clients(global_sets[0])]
        if local_acc is not None:
            out["dual_hm"] = harmonic_mean(local_acc, out["global_acc"])
    domains = [e for e in eval_sets if e.split == "domain"]
    if domains:
        several = len({e.dataset for e in domains}) > 1
        for item in domains:
            out[f"domain/{item.dataset}/{item.domain}" if several else f"domain/{item.domain}"] = per_set[item.name]
        total = sum(len(e.samples) for e in domains)
        out["multidomain_acc"] = sum(per_set[e.name] * len(e.samples) for e in domains) / max(total, 1)
    return out


#: summary.json / selected-round entries of the scenarios (besides the per-target and per-domain keys)
SUMMARY_KEYS = ("global_acc", "client_global_acc", "dual_hm", "unseen_acc", "multidomain_acc")
#: prefixes of the per-target and per-domain metric keys
KEY_PREFIXES = ("unseen/", "domain/", "ood/")


def scenario_keys(row: dict) -> list[str]:
    """The scenario metric keys a metrics row holds (per-target and per-domain keys included), in row order."""
    return [k for k in row if k in SUMMARY_KEYS or k.startswith(KEY_PREFIXES)]


def evaluation_sets(splits, eval_args) -> list:
    """The evaluation sets the round loop scores for accuracy besides each client's own test data: the data's base /
    novel sets and unseen datasets (not those named in ``eval.ood``: :func:`fedprompt.data.scenarios.ood_sets`),
    then the global sets (``eval.mode: global`` / ``dual``) and the per-domain sets (``eval.domains``)."""
    from fedprompt.data.scenarios import domain_sets, global_sets

    ood = set(eval_args.ood)  # sets named as OOD sets are scored for detection only, never for accuracy
    sets = [e for e in splits.eval_sets if e.split == "base" or (e.split == "novel" and "novel" not in ood)
            or (not e.seen and e.dataset not in ood)]
    whole = global_sets(splits)
    if eval_args.mode != "personal":
        sets += whole
    if eval_args.domains:
        sets += domain_sets(whole)
    return sets


def central_train(train, federation, num_clients: int):
    """The local-training settings of the centralised bound (``federation.central``): the same ``local_epochs``
    passes per round over the pooled data; ``local_steps`` times the clients the federation samples per round (so
    a round takes the federation's optimiser steps of a round)."""
    from dataclasses import replace

    if train.local_steps is None:
        return train
    per_round = num_clients if federation.fraction >= 1 else max(1, int(round(federation.fraction * num_clients)))
    return replace(train, local_steps=train.local_steps * per_round)


def scenario_line(summary: dict) -> str:
    """The scenario metrics of a summary as one printed line (empty when it has none)."""
    parts = []
    for key in scenario_keys(summary):
        value = summary[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:.4f}")
    return "   ".join(parts)
