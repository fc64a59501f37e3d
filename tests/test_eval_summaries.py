"""The evaluation's row entries from per-client scores (fedprompt.federation.eval_summaries), against direct
computations on the same logits and accuracies."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from fedprompt.calibration import CalibrationTally
from fedprompt.data.base import EvalSet
from fedprompt.federation.eval_summaries import (calibration_summary, fairness_summary, hm_summary, is_summary_key,
                                                 long_tail_summary, target_summary)
from fedprompt.metrics import class_counts, class_counts_metric


def evaluator(mode="personal", sets=(), groups=None, clients=3, global_model=False):
    ids = list(range(clients))
    return SimpleNamespace(clients=[SimpleNamespace(client_id=i) for i in ids], eval_sets=list(sets),
                           eval=SimpleNamespace(mode=mode), class_groups=groups,
                           set_clients=lambda e: ids[:1] if global_model else ids)


def tally(logits, labels):
    metric = CalibrationTally()
    metric.update(logits, labels)
    return metric.compute().flatten().tolist()


def counts(predicted, labels, classes=4):
    metric = class_counts_metric(classes)
    metric.update(torch.tensor(predicted), torch.tensor(labels))
    return class_counts(metric.compute(), classes)


def test_calibration_per_client_and_over_clients_equal_torchmetrics():
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 5, generator=generator) * 3, torch.randint(0, 5, (n,), generator=generator))
            for n in (20, 31, 7)]
    target = EvalSet("pacs/target/sketch", ["a"] * 5, [], "target", "pacs", seen=False)
    scores = {cid: {"calibration:test": tally(*data[cid]), "calibration:set/pacs/target/sketch": tally(*data[2 - cid])}
              for cid in range(3)}
    out = calibration_summary(evaluator(sets=[target]), scores, {})
    everything = MulticlassCalibrationError(num_classes=5)(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    assert out["ece"] == pytest.approx(float(everything), abs=1e-6)
    for cid, (x, y) in enumerate(data):
        assert out["client_ece"][cid] == pytest.approx(float(MulticlassCalibrationError(num_classes=5)(x, y)), abs=1e-6)
    assert out["target_ece"] == pytest.approx(float(everything), abs=1e-6)  # the same samples, another order
    assert len(out["calibration"]) == 48 and sum(out["calibration"][:16]) == 58
    # a client not scored (a Flower node that did not answer): NaN, left out of the pooled ECE
    del scores[1]["calibration:test"]
    out = calibration_summary(evaluator(sets=[target]), scores, {})
    assert math.isnan(out["client_ece"][1]) and "global_ece" not in out and "base_ece" not in out
    assert "ece" not in calibration_summary(evaluator(mode="global"), scores, {})


def test_target_and_fairness_by_hand():
    target = EvalSet("vlcs/target/SUN09", ["a"], [], "target", "vlcs", seen=False)
    name = "acc:set/vlcs/target/SUN09"
    scores = {0: {name: 0.5}, 1: {name: math.nan}, 2: {name: 0.8}}
    out = target_summary(evaluator(sets=[target]), scores, {})
    assert out == {"target_acc": pytest.approx(0.65), "target_acc_std": pytest.approx(0.15),
                   "target_acc_worst": 0.5, "target_acc_worst10": 0.5}
    assert target_summary(evaluator(), scores, {}) == {}
    assert target_summary(evaluator(sets=[target], global_model=True), scores, {}) == {"target_acc": 0.5}
    row = {"local_acc": 0.6, "local_acc_std": 0.123, "client_acc": [0.4, 0.6, 0.8], "base_acc": 0.7,
           "client_base_acc": [0.7, 0.7, 0.7]}
    out = fairness_summary(evaluator(), {}, row)
    assert "local_acc_std" not in out  # kept as the built-in summary wrote it
    assert out["local_acc_worst"] == 0.4 and out["local_acc_worst10"] == 0.4
    assert out["base_acc_std"] == pytest.approx(0, abs=1e-12) and out["base_acc_worst"] == 0.7


def test_both_hms_in_the_row():
    out = hm_summary(evaluator(), {}, {"local_acc": 0.9, "base_acc": 0.8, "novel_acc": 0.6, "hm": 0.6857})
    assert out["hm_base_novel"] == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert out["hm_local_base_novel"] == pytest.approx(3 / (1 / 0.9 + 1 / 0.8 + 1 / 0.6))
    assert "hm_local_base_novel" not in hm_summary(evaluator(), {}, {"base_acc": 0.8, "novel_acc": 0.6})
    assert hm_summary(evaluator(), {}, {"local_acc": 0.9}) == {}
    assert all(is_summary_key(k) for k in ("hm_base_novel", "ece", "novel_acc_worst10", "target_acc_std"))


def test_many_medium_few_pooled_over_clients_by_hand():
    groups = {"many": [0, 1], "medium": [2], "few": [3]}
    glob = EvalSet("lt/global", ["a"] * 4, [], "global", "lt")
    scores = {0: {"counts:test": counts([0, 1, 2, 3], [0, 1, 3, 3]), "counts:set/lt/global": counts([0, 0], [0, 1])},
              1: {"counts:test": counts([0, 2, 2], [1, 2, 2])}}
    out = long_tail_summary(evaluator(sets=[glob], groups=groups, clients=2), scores, {})
    # class 0: 1/1, class 1: 1/2, class 2: 2/2 (client 1) + 0/0, class 3: 1/2
    assert out["many_acc"] == pytest.approx((1 + 0.5) / 2) and out["medium_acc"] == 1 and out["few_acc"] == 0.5
    assert out["global_many_acc"] == pytest.approx((1 + 0) / 2) and math.isnan(out["global_few_acc"])
    assert long_tail_summary(evaluator(groups=None), scores, {}) == {}
