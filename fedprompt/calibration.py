"""Expected calibration error from binned tallies that add up across clients, processes and Flower messages.

torchmetrics' :class:`~torchmetrics.classification.MulticlassCalibrationError` keeps every sample's confidence until
``compute``; a federation needs the error of each client *and* of all clients' samples together, without moving
logits between processes. :class:`CalibrationTally` is a torchmetrics metric with the same binning whose state is
three sums per bin (samples, summed top-1 confidence, correct predictions): a client's tally is a short list of
numbers, tallies of several clients add up, and :func:`expected_calibration_error` of a tally (or of a sum of
tallies) is exactly what ``MulticlassCalibrationError(n_bins, norm="l1")`` computes on the same samples
(``tests/test_calibration.py`` checks it against torchmetrics and against a computation by hand).

Binning (torchmetrics'): ``n_bins`` equal-width bins of the top-1 softmax probability over [0, 1], bin ``b`` holding
confidences in ``[b/n, (b+1)/n)``, and one more bin for a confidence of exactly 1. ECE = sum over bins of
``|correct_b - confidence_b| / N``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

#: the number of confidence bins (torchmetrics' default)
DEFAULT_BINS = 15


class CalibrationTally(Metric):
    """Per-bin sums of samples, top-1 confidence and correct predictions, from logits and labels.

    ``compute()`` returns a ``[3, n_bins + 1]`` tensor (rows: count, confidence sum, correct sum);
    :func:`expected_calibration_error` and :func:`reliability` read it. ``sync_on_compute`` is off: the evaluator
    scores each client on one process and moves the tallies itself.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, n_bins: int = DEFAULT_BINS, **kwargs):
        super().__init__(sync_on_compute=False, **kwargs)
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        for name in ("count", "confidence", "correct"):  # float32 sums, as torchmetrics' own (and MPS has no float64)
            self.add_state(name, default=torch.zeros(n_bins + 1), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:  # noqa: D102 (torchmetrics API)
        probs = logits.float().softmax(dim=1)
        confidence, predicted = probs.max(dim=1)
        boundaries = torch.linspace(0, 1, self.n_bins + 1, dtype=confidence.dtype, device=confidence.device)
        index = torch.bucketize(confidence, boundaries, right=True) - 1
        dtype = self.count.dtype
        self.count.scatter_add_(0, index, torch.ones_like(confidence, dtype=dtype))
        self.confidence.scatter_add_(0, index, confidence.to(dtype))
        self.correct.scatter_add_(0, index, predicted.eq(target).to(dtype))

    def compute(self) -> torch.Tensor:  # noqa: D102 (torchmetrics API)
        return torch.stack([self.count, self.confidence, self.correct])


def as_tally(values) -> torch.Tensor:
    """A tally as a ``[3, bins]`` float64 tensor, from the tensor itself or its flat list (as a metrics row or a
    Flower message carries it: counts, then confidence sums, then correct sums)."""
    tally = torch.as_tensor(values, dtype=torch.float64)
    if tally.dim() == 1:
        if tally.numel() % 3:
            raise ValueError(f"a calibration tally has 3 x bins numbers, got {tally.numel()}")
        tally = tally.reshape(3, -1)
    return tally


def add_tallies(tallies) -> torch.Tensor | None:
    """The sum of several tallies (``None`` when there are none)."""
    tallies = [as_tally(t) for t in tallies if t is not None]
    return torch.stack(tallies).sum(0) if tallies else None


def expected_calibration_error(tally) -> float:
    """ECE (l1) of a tally: ``sum_b |correct_b - confidence_b| / N``; NaN for a tally of no samples."""
    tally = as_tally(tally)
    total = float(tally[0].sum())
    if total == 0:
        return float("nan")
    return float((tally[2] - tally[1]).abs().sum() / total)


def reliability(tally) -> dict:
    """The reliability diagram of a tally: each of the ``n_bins`` equal-width bins' lower edge, sample count, mean
    confidence and accuracy (NaN for an empty bin; the extra bin of confidence exactly 1 is folded into the last
    one)."""
    tally = as_tally(tally).clone()
    tally[:, -2] += tally[:, -1]
    tally = tally[:, :-1]
    bins = tally.shape[1]
    count = tally[0]
    safe = count.clamp(min=1)
    nan = torch.full_like(count, float("nan"))
    return {"lower": [b / bins for b in range(bins)], "count": count.tolist(),
            "confidence": torch.where(count > 0, tally[1] / safe, nan).tolist(),
            "accuracy": torch.where(count > 0, tally[2] / safe, nan).tolist()}
