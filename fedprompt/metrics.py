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
