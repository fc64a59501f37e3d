"""The evaluation's metrics beyond accuracy are the same under both runtimes: ``fedprompt fit --runtime flower`` (every
message serialised as on the wire; the calibration tallies and per-class counts travel as lists of floats) writes
the rows of ``--runtime fabric --federation.parallel_clients 1``, new keys and values included, for a
leave-one-domain-out run, a long-tailed run and a base-to-novel run, in the dual view."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr", reason="Flower is not installed (pip install -e \".[flower]\")")

from conftest import ROOT  # noqa: E402
from test_flower import assert_rows_equal, rows  # noqa: E402

SMOKE = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
SYNTHETIC = {"num_classes": 4, "train_per_class": 8, "test_per_class": 4, "image_size": 32}
CASES = {
    "lodo": ({"class_path": "fedprompt.methods.FedOTP", "init_args": {"n_ctx": 4, "lr": 0.5}},
             {"class_path": "fedprompt.data.LeaveOneDomainOut",
              "init_args": {"target": "domain2", "dataset": {"class_path": "fedprompt.data.Synthetic",
                                                             "init_args": {**SYNTHETIC, "num_domains": 3}}}},
             ("target_acc", "target_acc_worst10", "target_ece", "global_ece", "global_acc_worst", "ece")),
    "longtail": ({"class_path": "fedprompt.methods.PromptFL", "init_args": {"n_ctx": 4, "lr": 0.01}},
                 {"class_path": "fedprompt.data.LongTailed",
                  "init_args": {"imbalance_factor": 0.2, "many_above": 20, "few_at_most": 8,
                                "dataset": {"class_path": "fedprompt.data.Synthetic",
                                            "init_args": {**SYNTHETIC, "train_per_class": 30, "partition": {
                                                "class_path": "fedprompt.data.Dirichlet",
                                                "init_args": {"num_clients": 3, "alpha": 1.0, "min_size": 2}}}}}},
                 ("many_acc", "medium_acc", "few_acc", "global_many_acc", "global_few_acc", "calibration")),
    "base-to-novel": ({"class_path": "fedprompt.methods.FedPGP", "init_args": {"n_ctx": 4, "bottleneck": 2, "lr": 0.5}},
                      {**SMOKE["data"], "init_args": {**SMOKE["data"]["init_args"], "num_classes": 6,
                                                      "subsample_classes": "base"}},
                      ("hm_base_novel", "hm_local_base_novel", "base_ece", "novel_ece", "novel_acc_worst10")),
}


def config(tmp_path: Path, case: str) -> Path:
    method, data, _ = CASES[case]
    path = tmp_path / f"{case}.yaml"
    cfg = {**SMOKE, "method": method, "data": data, "eval": {**SMOKE["eval"], "mode": "dual"},
           "federation": {"rounds": 2, "fraction": 1.0}, "log": {"logger": "none", "progress": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_flower_rows_equal_fit_with_the_new_metrics(cli, case, tmp_path):
    path = config(tmp_path, case)
    for runtime in ("flower", "fabric"):
        code, _, err = cli("fit", "--config", path, "--runtime", runtime, "--federation.parallel_clients", "1",
                           "--out_dir", tmp_path / runtime)
        assert code == 0, err
    got, expected = rows(tmp_path / "flower"), rows(tmp_path / "fabric")
    assert_rows_equal(got, expected)
    for key in CASES[case][2]:
        assert key in expected[-1], key
    assert "unseen/synthetic" not in expected[-1]  # the held-out domain is target_acc, not a transfer target
