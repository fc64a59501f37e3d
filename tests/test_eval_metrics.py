"""The evaluation's metric functions against direct computations: ECE (by hand and torchmetrics), fairness over
clients, both HMs, per-class counts and the many / medium / few-shot groups."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from fedprompt.calibration import (CalibrationTally, add_tallies, as_tally, expected_calibration_error,
                                   reliability)
from fedprompt.data.longtail import class_groups
from fedprompt.metrics import (both_hms, class_counts, class_counts_metric, fairness, fairness_keys,
                               group_accuracy, harmonic_mean)


def tally_of(logits, labels, bins=15):
    metric = CalibrationTally(bins)
    metric.update(logits, labels)
    return metric.compute()


def test_ece_by_hand_on_known_logits():
    # two classes; logits chosen so the top-1 softmax probabilities are 0.95, 0.95, 0.65 and 0.65
    p = torch.tensor([0.95, 0.95, 0.65, 0.65])
    logits = torch.stack([torch.log(p), torch.log(1 - p)], dim=1)  # class 0 predicted every time
    labels = torch.tensor([0, 1, 0, 0])  # right, wrong, right, right
    # 10 bins: bin 9 [0.9, 1.0) holds 0.95, 0.95 (accuracy 1/2); bin 6 [0.6, 0.7) holds 0.65, 0.65 (accuracy 1):
    # ECE = 2/4 |0.5 - 0.95| + 2/4 |1 - 0.65| = 0.225 + 0.175
    tally = tally_of(logits, labels, bins=10)
    assert expected_calibration_error(tally) == pytest.approx(0.4, abs=1e-6)
    assert tally[0].tolist()[6] == 2 and tally[0].tolist()[9] == 2 and tally[0].sum() == 4
    diagram = reliability(tally)
    assert diagram["accuracy"][9] == pytest.approx(0.5) and diagram["confidence"][6] == pytest.approx(0.65)
    assert math.isnan(diagram["accuracy"][0]) and diagram["lower"][6] == pytest.approx(0.6)


@pytest.mark.parametrize("bins", [1, 5, 15])
def test_ece_equals_torchmetrics_per_client_and_over_clients(bins):
    generator = torch.Generator().manual_seed(0)
    clients = []
    for n in (37, 50, 13):
        logits = torch.randn(n, 6, generator=generator) * 4  # outside [0, 1]: torchmetrics applies the softmax
        labels = torch.randint(0, 6, (n,), generator=generator)
        clients.append((logits, labels))
    reference = MulticlassCalibrationError(num_classes=6, n_bins=bins, norm="l1")
    tallies = []
    for logits, labels in clients:
        tallies.append(tally_of(logits, labels, bins))
        expected = MulticlassCalibrationError(num_classes=6, n_bins=bins, norm="l1")(logits, labels)
        assert expected_calibration_error(tallies[-1]) == pytest.approx(float(expected), abs=1e-6)
        reference.update(logits, labels)
    # the tallies add up to the ECE of every client's samples together
    assert expected_calibration_error(add_tallies(tallies)) == pytest.approx(float(reference.compute()), abs=1e-6)
    # a flat list (as a row or a Flower message carries it) reads back as the same tally
    flat = tallies[0].flatten().tolist()
    assert torch.equal(as_tally(flat), tallies[0].double()) and len(flat) == 3 * (bins + 1)


def test_confidence_one_lands_in_the_extra_bin_like_torchmetrics():
    logits = torch.tensor([[100.0, -100.0], [100.0, -100.0]])  # softmax top-1 is exactly 1.0 in float32
    labels = torch.tensor([0, 1])
    tally = tally_of(logits, labels, bins=4)
    assert tally[0].tolist() == [0, 0, 0, 0, 2]
    expected = MulticlassCalibrationError(num_classes=2, n_bins=4)(logits, labels)
    assert expected_calibration_error(tally) == pytest.approx(float(expected)) == pytest.approx(0.5)
    assert reliability(tally)["count"] == [0, 0, 0, 2]
    assert math.isnan(expected_calibration_error(torch.zeros(3, 5)))


def test_fairness_by_hand():
    values = [0.9, 0.5, math.nan, 0.7, 0.8, 0.6, 0.65, 0.75, 0.85, 0.55, 0.95, 0.4]
    kept = sorted(v for v in values if not math.isnan(v))  # 11 clients scored
    mean = sum(kept) / len(kept)
    out = fairness(values)
    assert out["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept)))
    assert out["worst"] == 0.4
    assert out["worst10"] == pytest.approx((0.4 + 0.5) / 2)  # ceil(1.1) = 2 clients
    assert fairness([0.3, 0.6])["worst10"] == 0.3  # at least one client
    assert fairness([0.1 * k for k in range(1, 31)])["worst10"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)  # exactly 3
    assert fairness([math.nan]) == {} and fairness([]) == {}
    assert fairness_keys("base_acc", [0.2, 0.4]) == {"base_acc_std": pytest.approx(0.1), "base_acc_worst": 0.2,
                                                     "base_acc_worst10": 0.2}


def test_both_hms():
    out = both_hms(0.9, 0.6, 0.3)
    assert out["hm_base_novel"] == pytest.approx(2 * 0.6 * 0.3 / 0.9)
    assert out["hm_local_base_novel"] == pytest.approx(3 / (1 / 0.9 + 1 / 0.6 + 1 / 0.3))
    assert harmonic_mean(0.5, 0.0) == 0.0
    assert both_hms(None, 0.6, 0.3) == {"hm_base_novel": pytest.approx(0.4)}


def test_class_counts_and_many_medium_few_by_hand():
    metric = class_counts_metric(4)
    predicted = torch.tensor([0, 0, 1, 2, 2, 3, 3, 1])
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 0])
    metric.update(predicted, labels)
    counts = class_counts(metric.compute(), 4)
    correct, total = counts[:4], counts[4:]
    assert correct == [1, 1, 1, 2] and total == [2, 2, 1, 3]
    groups = class_groups([500, 101, 100, 21, 20, 3])  # FedPuReL: many > 100, few <= 20
    assert groups == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    accs = group_accuracy(correct, total, {"many": [0, 1], "medium": [2, 3], "few": [5]})
    assert accs["many"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # the mean of per-class accuracies
    assert accs["medium"] == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(accs["few"])  # class 5 has no test samples
