"""``fedprompt table`` with the evaluation's metrics: fairness columns (also from older run folders), the
leave-one-domain-out columns, the long-tailed column name and the reliability diagram."""

from __future__ import annotations

import math

import pytest
import torch

from test_table import config, fake_run, fake_sweep, read_csv, table
from fedprompt.calibration import CalibrationTally, add_tallies
from fedprompt.errors import FedPromptError
from fedprompt.table import collect
from fedprompt.table_metrics import row_tallies


def lodo_config(method="PromptFL", target="sketch", seed=0):
    cfg = config(method, seed=seed)
    inner = cfg["data"]
    cfg["data"] = {"class_path": "fedprompt.data.LeaveOneDomainOut",
                   "init_args": {"dataset": {**inner, "class_path": "fedprompt.data.PACS"}, "target": target,
                                 "seed": seed}}
    return cfg


def test_fairness_columns_from_new_keys_and_from_older_client_lists(tmp_path):
    new = fake_run(tmp_path / "new", config(), local_acc=0.7, local_acc_std=0.1, local_acc_worst=0.5,
                   local_acc_worst10=0.5)
    old = fake_run(tmp_path / "old", config("FedOTP"), local_acc=0.75, local_acc_std=0.05,
                   client_acc=[0.9, 0.6, float("nan"), 0.75])  # written before the fairness keys
    out = table(tmp_path, new, old, columns="metrics",
                metrics=["local_acc", "local_acc_std", "local_acc_worst", "local_acc_worst10"])
    assert out["columns"] == ["Local", "Local std", "Local worst", "Local worst 10%"]
    assert out["cells"]["FedOTP"]["Local worst"]["mean"] == 0.6  # the NaN client (not scored) left out
    assert out["cells"]["FedOTP"]["Local worst 10%"]["mean"] == 0.6  # ceil(0.3) = 1 client
    assert out["cells"]["PromptFL"]["Local worst"]["mean"] == 0.5


def test_domain_columns_per_held_out_domain_and_their_mean(tmp_path):
    runs = []
    for method, accs in (("PromptFL", (0.5, 0.7)), ("FedOTP", (0.6, 0.4))):
        for target, acc in zip(("sketch", "photo"), accs):
            runs.append(fake_sweep(tmp_path / f"{method}-{target}", lodo_config(method, target),
                                   {1: {"target_acc": acc, "local_acc": 0.9}, 2: {"target_acc": acc + 0.1,
                                                                                  "local_acc": 0.9}}))
    out = table(tmp_path, *runs, columns="domains")
    assert out["columns"] == ["sketch", "photo", "Mean"]
    assert out["cells"]["PromptFL"]["sketch"]["mean"] == pytest.approx(0.55)
    assert out["cells"]["PromptFL"]["Mean"]["mean"] == pytest.approx((0.55 + 0.75) / 2)
    assert out["cells"]["FedOTP"]["Mean"]["mean"] == pytest.approx((0.65 + 0.45) / 2)
    assert [r["column"] for r in read_csv(tmp_path)][:3] == ["sketch", "photo", "Mean"]
    out = table(tmp_path, *runs, columns="domains", metric="local_acc")
    assert out["cells"]["FedOTP"]["Mean"]["mean"] == pytest.approx(0.9)
    with pytest.raises(FedPromptError, match="--columns domains needs leave-one-domain-out runs"):
        table(tmp_path, fake_run(tmp_path / "plain", config(), local_acc=0.5), columns="domains")
    # the held-out domain is part of the column: runs of two targets are never seeds of one cell
    assert len(collect([str(r) for r in runs], {})) == 4


def test_long_tailed_column_name(tmp_path):
    cfg = config()
    cfg["data"] = {"class_path": "fedprompt.data.LongTailed",
                   "init_args": {"dataset": {"class_path": "fedprompt.data.CIFAR", "init_args": {"root": "/d/cifar10"}},
                                 "imbalance_factor": 0.01}}
    out = table(tmp_path, fake_run(tmp_path / "lt", cfg, local_acc=0.5, many_acc=0.7, medium_acc=0.5, few_acc=0.2),
                columns="metrics", metrics=["many_acc", "medium_acc", "few_acc"])
    assert out["columns"] == ["Many", "Medium", "Few"] and "cifar10 LT (IF 100)" in (tmp_path / "out" /
                                                                                    "table.md").read_text()


def test_reliability_diagram_from_the_runs_tallies(tmp_path):
    pytest.importorskip("matplotlib")
    metric = CalibrationTally(10)
    metric.update(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.9]]), torch.tensor([0, 0, 1]))
    tally = metric.compute().flatten().tolist()
    a = fake_sweep(tmp_path / "a", config(), {1: {"local_acc": 0.5, "calibration": tally},
                                              2: {"local_acc": 0.6, "calibration": tally}})
    b = fake_run(tmp_path / "b", config("FedOTP"), local_acc=0.4)  # no tally: no curve
    results = collect([str(a), str(b)], {})
    tallies = row_tallies(results)
    assert list(tallies) == ["PromptFL"] and torch.equal(tallies["PromptFL"], add_tallies([tally, tally]))
    out = table(tmp_path, a, b)
    assert any(f.endswith("table.png") for f in out["files"])
    assert math.isclose(tallies["PromptFL"][0].sum().item(), 6)


def test_best_of_an_ece_or_a_spread_is_the_lowest(tmp_path):
    a = fake_run(tmp_path / "a", config(), local_acc=0.7, local_acc_std=0.2, ece=0.30)
    b = fake_run(tmp_path / "b", config("FedOTP"), local_acc=0.6, local_acc_std=0.1, ece=0.05)
    out = table(tmp_path, a, b, columns="metrics", metrics=["local_acc", "local_acc_std", "ece"])
    best = {col: [row for row in out["rows"] if out["cells"][row][col]["best"]] for col in out["columns"]}
    assert best == {"Local": ["PromptFL"], "Local std": ["FedOTP"], "ECE": ["FedOTP"]}
    assert "best per column in bold (the lowest ECE, std or FPR95)." in (tmp_path / "out" / "table.md").read_text()
    runs = [fake_run(tmp_path / f"{m}-{t}", lodo_config(m, t), target_acc=0.5, target_ece=e, local_acc=0.9)
            for m, t, e in (("PromptFL", "sketch", 0.3), ("PromptFL", "photo", 0.2), ("FedOTP", "sketch", 0.1),
                            ("FedOTP", "photo", 0.3))]
    out = table(tmp_path, *runs, columns="domains", metric="target_ece")
    assert [row for row in out["rows"] if out["cells"][row]["Mean"]["best"]] == ["FedOTP"]  # 0.2 < 0.25
    assert out["cells"]["PromptFL"]["photo"]["best"] and not out["cells"]["FedOTP"]["photo"]["best"]
