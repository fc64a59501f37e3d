"""Robust aggregation (issue 29): each rule against a direct computation on small known inputs and against Flower's
aggregation functions, norm bounding, order (K) invariance, the one-line refusals of what cannot combine, and runs
of the smoke config with a rule on (K = 1 against K = 4; the rows name the kept and bounded clients)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="robust aggregation runs Flower's aggregation functions (pip install flwr)")

from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg  # noqa: E402

from conftest import ROOT, read_rows  # noqa: E402
from fedprompt.errors import FedPromptError  # noqa: E402
from fedprompt.federation.aggregators import WeightedMean  # noqa: E402
from fedprompt.federation.robust import (RobustAggregator, bound_update, check_robust, coordinate_rule,  # noqa: E402
                                         krum_scores, krum_select)
from fedprompt.threats import RobustArgs  # noqa: E402

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def uploads_of(rows: list[list[float]]) -> dict:
    """Client i uploads ``{"a": rows[i][:2], "b": rows[i][2:]}`` (two tensors of float32)."""
    return {i: {"a": torch.tensor(r[:2], dtype=torch.float32), "b": torch.tensor([r[2:]], dtype=torch.float32)}
            for i, r in enumerate(rows)}


def flat(state: dict) -> list[float]:
    return [float(x) for key in sorted(state) for x in state[key].flatten()]


def flower_input(uploads: dict, weights: dict | None = None) -> list:
    return [([uploads[i][k].double().numpy() for k in sorted(uploads[i])], (weights or {}).get(i, 1))
            for i in sorted(uploads)]


ROWS = [[1.0, 2.0, 3.0, -1.0], [4.0, 0.0, 6.0, 5.0], [7.0, 8.0, 0.0, 2.0], [2.5, 1.0, 1.0, 9.0]]


def test_median_is_the_coordinate_wise_median_and_flowers():
    uploads = uploads_of(ROWS[:3])
    got = coordinate_rule(uploads, "median", 0.0)
    assert flat(got) == [4.0, 2.0, 3.0, 2.0]  # by hand: the middle value of each coordinate
    even = coordinate_rule(uploads_of(ROWS), "median", 0.0)
    assert flat(even) == [3.25, 1.5, 2.0, 3.5]  # the mean of the two middle values
    expected = aggregate_median(flower_input(uploads_of(ROWS)))
    assert flat(even) == [float(x) for a in expected for x in a.ravel()]
    assert all(v.dtype == torch.float32 for v in even.values())


def test_trimmed_mean_cuts_int_trim_n_at_each_end_and_equals_flowers():
    rows = ROWS + [[100.0, -100.0, 50.0, 0.0]]
    uploads = uploads_of(rows)
    got = coordinate_rule(uploads, "trimmed_mean", 0.2)  # int(0.2 * 5) = 1 cut at each end
    columns = np.sort(np.array(rows), axis=0)[1:-1].mean(0)
    assert np.allclose(flat(got), columns, rtol=0, atol=1e-6)
    expected = aggregate_trimmed_avg(flower_input(uploads), 0.2)
    assert np.allclose(flat(got), [float(x) for a in expected for x in a.ravel()], rtol=0, atol=1e-6)
    assert flat(coordinate_rule(uploads, "trimmed_mean", 0.0)) == pytest.approx(np.array(rows).mean(0).tolist())


def test_krum_scores_by_hand_and_selection_equals_flowers_krum():
    rows = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
            [10.0, 10.0, 10.0, 10.0]]
    uploads = uploads_of(rows)
    scores = krum_scores(uploads, malicious=1)  # n - f - 2 = 2 nearest others
    points = np.array(rows)
    for i in range(5):
        d = sorted(((points[i] - points[j]) ** 2).sum() for j in range(5) if j != i)
        assert scores[i] == pytest.approx(sum(d[:2]))
    assert krum_select(uploads, 1, 1) == [0]
    weights = {0: 3, 1: 1, 2: 2, 3: 5, 4: 1}
    single = aggregate_krum(flower_input(uploads, weights), 1, 0)
    assert flat(uploads[0]) == [float(x) for a in single for x in a.ravel()]
    rule = RobustAggregator(WeightedMean(("a", "b")), "krum", malicious=1, keep=3)
    merged = rule.aggregate(uploads, weights, 1)
    multi = aggregate_krum(flower_input(uploads, weights), 1, 3)  # the weighted mean of the 3 best
    assert np.allclose(flat(merged), [float(x) for a in multi for x in a.ravel()], rtol=0, atol=1e-6)
    assert rule.round_metrics()["robust_kept"] == krum_select(uploads, 1, 3) and 4 not in krum_select(uploads, 1, 3)


def test_rules_do_not_depend_on_the_order_uploads_arrive_in():
    uploads = uploads_of(ROWS)
    backwards = {i: uploads[i] for i in reversed(sorted(uploads))}
    for rule in ("median", "trimmed_mean"):
        assert flat(coordinate_rule(uploads, rule, 0.25)) == flat(coordinate_rule(backwards, rule, 0.25))
    assert krum_select(uploads, 1, 2) == krum_select(backwards, 1, 2)


def test_norm_bound_scales_the_update_to_the_bound_and_leaves_small_ones_alone():
    reference = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0, 0.0]])}
    upload = {"a": torch.tensor([4.0, 5.0]), "b": torch.tensor([[0.0, 0.0]])}  # update (3, 4): norm 5
    bounded, scaled = bound_update(upload, reference, 1.0)
    assert scaled and torch.allclose(bounded["a"], torch.tensor([1.6, 1.8])) and bounded["a"].dtype == torch.float32
    same, scaled = bound_update(upload, reference, 5.0)
    assert not scaled and same is upload
    rule = RobustAggregator(WeightedMean(("a", "b")), "none", norm_bound=1.0)
    out = rule.bound({0: upload, 1: reference}, reference, 1)
    assert rule.round_metrics()["robust_bounded"] == [0] and out[1] is reference


def test_what_cannot_combine_is_one_line():
    from fedprompt.methods import FedMGP, LocalCoOp, PromptFL

    mean = WeightedMean(("prompt.",))
    with pytest.raises(FedPromptError, match="robust.rule median with client-level DP: DP-FedAvg's noise"):
        check_robust(RobustArgs(rule="median"), PromptFL(), mean, dp_enabled=True)
    check_robust(RobustArgs(norm_bound=1.0), PromptFL(), mean, dp_enabled=True)  # norm bounding composes with DP
    method = FedMGP()
    with pytest.raises(FedPromptError, match="FedMGP's server rule is not a mean of the uploads"):
        check_robust(RobustArgs(rule="trimmed_mean"), method, method.build_aggregator(), dp_enabled=False)
    check_robust(RobustArgs(rule="krum"), method, method.build_aggregator(), dp_enabled=False)
    with pytest.raises(FedPromptError, match="LocalCoOp shares no trained state"):
        check_robust(RobustArgs(rule="krum"), LocalCoOp(), mean, dp_enabled=False)


def fit(cli, out, *flags):
    code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "none", "--out_dir", out, *flags)
    assert code == 0, err
    return out


@pytest.mark.parametrize("rule", [["--robust.rule", "median"], ["--robust.rule", "trimmed_mean"],
                                  ["--robust.rule", "krum", "--robust.malicious", "0", "--robust.keep", "2",
                                   "--robust.norm_bound", "0.05"]])
def test_a_run_with_a_rule_is_k_invariant(cli, tmp_path, rule):
    """The rule sees the uploads in client-id order on the server: lock-step groups of 1 and of 4 clients give the
    same global state up to float rounding (the uploads themselves agree only to rounding across K)."""
    one = fit(cli, tmp_path / "one", *rule, "--federation.parallel_clients", "1")
    four = fit(cli, tmp_path / "four", *rule, "--federation.parallel_clients", "4")
    states = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global"] for run in (one, four)]
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], rtol=0, atol=1e-5), key
    rows = read_rows(one)
    if "krum" in rule:
        assert all(len(row["robust_kept"]) == 2 for row in rows) and "robust_bounded" in rows[0]
    summary = json.loads((one / "summary.json").read_text())
    assert summary["local_acc"] == pytest.approx(read_rows(four)[-1]["local_acc"], abs=0.05)


def test_the_trimmed_mean_that_cuts_nothing_and_krum_without_its_guarantee_warn(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "none", "--robust.rule", "trimmed_mean",
                       "--robust.trim", "0.1", "--federation.rounds", "1", "--out_dir", tmp_path / "t")
    assert code == 0 and "robust.trim 0.1 cuts int(0.1 x 4) = 0 of the 4 uploads" in err
    code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "none", "--robust.rule", "krum",
                       "--federation.rounds", "1", "--out_dir", tmp_path / "k")
    assert code == 0 and "Krum's guarantee needs more than 2 f + 2 = 4 uploads a round, and a round has 4" in err
