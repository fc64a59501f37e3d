"""Accuracy of each client on its own data and the summaries reported per round."""

from __future__ import annotations

import math

import torch


def accuracy_metric(num_classes: int):
    """Top-1 accuracy over all samples (micro average) of ONE client on this rank.

    ``sync_on_compute=False``: each rank evaluates different clients; the round loop gathers the per-client results
    itself (torchmetrics' default would sum the counts of different clients across ranks, and hang when ranks hold
    different numbers of clients)."""
    from torchmetrics.classification import MulticlassAccuracy  # here: the CLI starts without torchmetrics

    return MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False)


def summarize(client_acc: dict[int, float], client_n: dict[int, int], global_model: bool) -> dict:
    """``local_acc`` (mean over clients), ``local_acc_std`` and, for methods with one global model, ``global_acc``
    (accuracy on the union of the clients' test data)."""
    ids = sorted(client_acc)
    values = torch.tensor([client_acc[i] for i in ids], dtype=torch.float64)
    out = {"local_acc": float(values.mean()) if ids else math.nan,
           "local_acc_std": float(values.std(unbiased=False)) if ids else math.nan}
    if global_model and ids:
        total = sum(client_n[i] for i in ids)
        out["global_acc"] = sum(client_acc[i] * client_n[i] for i in ids) / max(total, 1)
    return out


def harmonic_mean(*values: float) -> float:
    """Harmonic mean (HM = 2BN/(B+N) for two values)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# ------------------------------------------------------------------------------------------ the two HMs
#: row key of the 2-way harmonic mean of base and novel accuracy (also written as ``hm``, its name before 0.3)
HM_BASE_NOVEL = "hm_base_novel"
#: row key of the 3-way harmonic mean of local, base and novel accuracy (FedPGP / PromptFolio's "HM")
HM_LOCAL_BASE_NOVEL = "hm_local_base_novel"


def both_hms(local_acc: float | None, base_acc: float, novel_acc: float) -> dict:
    """The two harmonic means papers call "HM", each under its own key: :data:`HM_BASE_NOVEL` (2BN / (B + N); the
    old ``hm``, beside the combined metric ``cm`` = (Local + HM_BN) / 2) and, with a local accuracy,
    :data:`HM_LOCAL_BASE_NOVEL` (3 / (1/L + 1/B + 1/N))."""
    out = {HM_BASE_NOVEL: harmonic_mean(base_acc, novel_acc)}
    if local_acc is not None and not math.isnan(local_acc):
        out[HM_LOCAL_BASE_NOVEL] = harmonic_mean(local_acc, base_acc, novel_acc)
    return out


# --------------------------------------------------------------------------------- fairness over clients
#: the share of clients whose mean is ``<metric>_worst10``
WORST_SHARE = 0.1


def fairness(values: list[float]) -> dict:
    """The spread of one accuracy over clients: ``std`` (population), ``worst`` (the lowest client) and ``worst10``
    (the mean of the worst ceil(10 %) of the clients, at least one). NaN values (clients not scored) are left out;
    ``{}`` when no client has a value."""
    kept = sorted(v for v in values if v is not None and not math.isnan(v))
    if not kept:
        return {}
    count = max(1, math.ceil(WORST_SHARE * len(kept) - 1e-9))
    return {"std": float(torch.tensor(kept, dtype=torch.float64).std(unbiased=False)), "worst": kept[0],
            "worst10": sum(kept[:count]) / count}


def fairness_keys(name: str, values: list[float]) -> dict:
    """:func:`fairness` of ``values`` as row keys ``<name>_std``, ``<name>_worst``, ``<name>_worst10``."""
    return {f"{name}_{stat}": value for stat, value in fairness(values).items()}


# ------------------------------------------------------------------------------ per-class counts, long tail
def class_counts_metric(num_classes: int):
    """Per-class (correct, total) counts of ONE client (torchmetrics' per-class stat scores: true positives and
    support); :func:`class_counts` reads its ``compute()``."""
    from torchmetrics.classification import MulticlassStatScores

    return MulticlassStatScores(num_classes=max(2, num_classes), average="none", sync_on_compute=False)


def class_counts(stat_scores: torch.Tensor, num_classes: int) -> list[float]:
    """The flat ``[correct_0 .. correct_{C-1}, total_0 .. total_{C-1}]`` of a ``[C, 5]`` stat-scores result (true
    positives, false positives, true negatives, false negatives, support)."""
    stats = stat_scores[:num_classes]
    return [float(v) for v in stats[:, 0]] + [float(v) for v in stats[:, 4]]


def group_accuracy(correct: list[float], total: list[float], groups: dict[str, list[int]]) -> dict[str, float]:
    """Each group's accuracy as FedPuReL reports it: the mean over the group's classes of each class's accuracy
    (classes without test samples left out; NaN for a group without any)."""
    out = {}
    for name, labels in groups.items():
        accs = [correct[c] / total[c] for c in labels if c < len(total) and total[c] > 0]
        out[name] = sum(accs) / len(accs) if accs else math.nan
    return out
