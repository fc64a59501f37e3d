"""Client-level DP (DP-FedAvg): clipping, the server's noise, adaptive clipping, Poisson sampling, the accountant
(against published values and an independent RDP computation), calibration, bad input, resume exactness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, read_rows, without_timings
from fedprompt.args import DPArgs
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import WeightedMean
from fedprompt.federation.accounting import ClientAccountant, RoundShape, calibrate_noise_multiplier, record_epsilon
from fedprompt.federation.privacy import (PrivateAggregator, clip_update, flat_norm, gaussian_noise, noise_seed,
                                          poisson_sample, update_noise_multiplier)

pytest.importorskip("dp_accounting")

SMOKE = str(ROOT / "configs" / "smoke.yaml")


# ------------------------------------------------------------------------------------------------- clipping
def test_clipping_bounds_the_flat_norm_over_all_shared_tensors():
    torch.manual_seed(0)
    delta = {"a": torch.randn(4, 8), "b": torch.randn(3)}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in delta.values()))
    clipped, seen = clip_update(delta, 0.5)
    assert seen == pytest.approx(norm) and flat_norm(clipped) == pytest.approx(0.5, rel=1e-12)
    for key in delta:  # one scale for every tensor: the direction is kept
        torch.testing.assert_close(clipped[key], delta[key].double() * (0.5 / norm))
    same, _ = clip_update(delta, 2 * norm)  # under the bound: unchanged
    for key in delta:
        torch.testing.assert_close(same[key], delta[key].double())
    zero, zero_norm = clip_update({"a": torch.zeros(5)}, 1.0)  # no division by zero
    assert zero_norm == 0 and torch.equal(zero["a"], torch.zeros(5, dtype=torch.float64))


def test_server_noise_has_the_standard_deviation_and_is_a_function_of_seed_and_round():
    template = {"x": torch.zeros(400, 500), "y": torch.zeros(7)}
    noise = gaussian_noise(template, 0.3, noise_seed(5, 2))
    values = noise["x"].flatten()
    assert values.std().item() == pytest.approx(0.3, rel=0.01)  # 200,000 draws: the std within 1 %
    assert abs(values.mean().item()) < 0.003
    again = gaussian_noise(template, 0.3, noise_seed(5, 2))
    assert all(torch.equal(noise[k], again[k]) for k in template)  # every process draws the same
    other_round = gaussian_noise(template, 0.3, noise_seed(5, 3))
    other_seed = gaussian_noise(template, 0.3, noise_seed(6, 2))
    assert not torch.equal(noise["x"], other_round["x"]) and not torch.equal(noise["x"], other_seed["x"])


def _server(z=0.0, clip=1.0, clients=4, rate=1.0, **kwargs):
    shape = RoundShape(clients, rate, "poisson", clients, False)
    server = PrivateAggregator(WeightedMean(("p",)), z, clip, 1e-5, shape, **kwargs)
    server.seed = 3
    return server


def test_private_mean_is_the_uniform_clipped_sum_over_the_fixed_denominator():
    global_state = {"p": torch.zeros(2, 3)}
    uploads = {0: {"p": torch.full((2, 3), 2.0)}, 1: {"p": torch.full((2, 3), 0.1)}}  # norms 4.9 and 0.24
    server = _server(z=0.0, clip=1.0, clients=4)
    server.begin_round(1, global_state)
    merged = server.aggregate(uploads, {0: 1000, 1: 1}, 1)  # data sizes are ignored (uniform)
    expected = (uploads[0]["p"] / flat_norm(uploads[0]) + uploads[1]["p"]) / 4  # fixed denominator m = 4, not 2
    torch.testing.assert_close(merged["p"], expected)
    assert server.round_metrics()["dp_clients"] == 2


def test_private_mean_noise_std_is_z_clip_over_m_and_empty_rounds_release_noise():
    global_state = {"p": torch.ones(300, 300)}
    server = _server(z=2.0, clip=0.5, clients=10, rate=1.0)
    server.begin_round(4, global_state)
    merged = server.aggregate({}, {}, 4)  # nobody sampled: the noise is still released
    noise = merged["p"].double() - 1.0
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 10, rel=0.01)
    server.begin_round(4, global_state)
    assert torch.equal(server.aggregate({}, {}, 4)["p"], merged["p"])  # seeded by the run seed and the round


def test_adaptive_clipping_follows_the_unclipped_fraction_and_noises_with_the_norm_used():
    """Andrew et al.: C <- C exp(-eta (unclipped fraction - gamma)); every update below C shrinks C, every update
    above it grows C (Flower's clipped fraction would do the opposite)."""
    small = {k: {"p": torch.full((4,), 0.01)} for k in range(100)}
    large = {k: {"p": torch.full((4,), 10.0)} for k in range(100)}
    for uploads, grows in ((small, False), (large, True)):
        server = _server(z=1e-3, clip=1.0, clients=100, adaptive=True, count_stddev=1.0)
        server.begin_round(1, {"p": torch.zeros(4)})
        merged = server.aggregate(uploads, {}, 1)
        fraction = server.round_metrics()["dp_unclipped_fraction"]
        assert fraction == pytest.approx(1.0 if not grows else 0.0, abs=0.05)  # noise 1 on a count of 100
        assert (server.clip_norm > 1.0) == grows
        assert server.clip_norm == pytest.approx(math.exp(-0.2 * (fraction - 0.5)))
        if grows:  # the updates were clipped to C_t = 1, not to the new norm
            assert flat_norm({"p": merged["p"].double()}) == pytest.approx(1.0, rel=1e-3)
    # the update's noise multiplier leaves room for the count's: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2
    z_delta = update_noise_multiplier(1.0, 5.0)
    assert z_delta ** -2 + (2 * 5.0) ** -2 == pytest.approx(1.0)
    with pytest.raises(FedPromptError, match="dp.count_stddev"):
        update_noise_multiplier(1.0, 0.4)


def test_poisson_sampling_rate_and_determinism():
    draws = [poisson_sample(50, 0.2, seed=1, round_idx=r) for r in range(400)]
    sizes = np.array([len(d) for d in draws])
    assert sizes.mean() == pytest.approx(10, rel=0.05) and sizes.std() > 1  # a varying sample, mean q K
    assert poisson_sample(50, 0.2, 1, 7) == draws[7] and all(d == sorted(d) for d in draws)
    assert 0 in sizes or sizes.min() < 5  # some rounds are small: the loop must aggregate empty rounds too


# ----------------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("z, q, rounds, published", [
    (1.0, 1.0, 50, 57.3), (5.0, 1.0, 50, 7.08), (10.0, 1.0, 50, 3.19), (1.0, 0.1, 100, 7.90), (1.0, 0.01, 1000, 2.10),
])
def test_epsilon_matches_the_published_values(z, q, rounds, published):
    """specs/baselines-multimodal.md section 5.4 (dp-accounting and Opacus agree to 3 decimals there)."""
    accountant = ClientAccountant(z, 1e-5, RoundShape(100, q, "poisson", 0, False))
    assert accountant.epsilon(rounds) == pytest.approx(published, abs=0.01)


def _independent_epsilon(z: float, q: float, steps: int, delta: float, orders) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer orders (Mironov, Talwar, Zhang 2019: the binomial
    expansion of A_alpha), composed over ``steps``, converted with Balle et al. 2020 (Thm 21)."""
    best = math.inf
    for alpha in orders:
        k = np.arange(alpha + 1)
        log_binom = np.array([math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1) for i in k])
        with np.errstate(divide="ignore"):
            terms = log_binom + (alpha - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * z * z)
        rdp = steps * np.logaddexp.reduce(terms) / (alpha - 1)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


@pytest.mark.parametrize("z, q, rounds", [(1.1, 0.05, 300), (2.0, 0.3, 40), (0.8, 0.01, 2000)])
def test_epsilon_matches_an_independent_rdp_computation(z, q, rounds):
    from dp_accounting import PoissonSampledDpEvent, GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    orders = list(range(2, 65))
    ours = RdpAccountant(orders=orders).compose(
        SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)).get_epsilon(1e-5)
    assert ours == pytest.approx(_independent_epsilon(z, q, rounds, 1e-5, orders), rel=1e-6)
    # the Gaussian without sampling: RDP(alpha) = alpha / (2 z^2) exactly
    everyone = ClientAccountant(z, 1e-5, RoundShape(10, 1.0)).epsilon(rounds)
    closed = min(rounds * a / (2 * z * z) + math.log1p(-1 / a) - (math.log(1e-5) + math.log(a)) / (a - 1)
                 for a in [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
    assert everyone == pytest.approx(closed, rel=1e-9)


def test_round_one_with_every_client_counts_as_an_unsampled_round():
    shape = RoundShape(100, 0.1, "poisson", 10, everyone_first=True)
    first = ClientAccountant(1.0, 1e-5, shape).epsilon(1)
    assert first == pytest.approx(ClientAccountant(1.0, 1e-5, RoundShape(100, 1.0)).epsilon(1))
    eps = [ClientAccountant(1.0, 1e-5, shape).epsilon(r) for r in (1, 2, 10)]
    assert eps[0] < eps[1] < eps[2]


def test_calibration_reaches_the_target_and_an_unreachable_target_is_one_line():
    shape = RoundShape(10, 1.0)
    z = calibrate_noise_multiplier(8.0, 1e-5, 50, shape)
    assert z == pytest.approx(4.51, abs=0.01)  # the spec's calibration (section 5.4)
    assert ClientAccountant(z, 1e-5, shape).epsilon(50) <= 8.0
    assert ClientAccountant(z * 0.99, 1e-5, shape).epsilon(50) > 8.0  # the smallest such noise
    assert calibrate_noise_multiplier(1.0, 1e-5, 50, shape) == pytest.approx(28.6, abs=0.1)
    with pytest.raises(FedPromptError, match=r"^dp.target_epsilon: 0.001 at delta 1e-05 cannot be reached in 50"):
        calibrate_noise_multiplier(1e-3, 1e-5, 50, shape)  # below what a noise multiplier of 1e4 gives


def test_fixed_size_sampling_uses_the_replace_one_bound_with_twice_the_sensitivity():
    shape = RoundShape(100, 0.1, "fixed", 10, False)
    assert shape.replace_one
    from dp_accounting import GaussianDpEvent, SampledWithoutReplacementDpEvent, SelfComposedDpEvent
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    direct = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE).compose(
        SelfComposedDpEvent(SampledWithoutReplacementDpEvent(100, 10, GaussianDpEvent(1.0)), 100)).get_epsilon(1e-5)
    assert direct == pytest.approx(14.05, abs=0.01)  # the spec's value for noise multiplier 1 w.r.t. the sensitivity
    assert ClientAccountant(2.0, 1e-5, shape).epsilon(100) == pytest.approx(direct)  # z = 2: sensitivity 2 S


def test_record_level_epsilon_counts_every_step():
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    def direct(q, steps):
        return RdpAccountant().compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(1.2)),
                                                           steps)).get_epsilon(1e-5)

    eps = record_epsilon(1.2, 1e-5, {(0.1, 130): 3, (0.25, 52): 1})
    assert eps == pytest.approx(max(direct(0.1, 130), direct(0.25, 52)))
    assert record_epsilon(1.2, 1e-5, {(0.1, 13): 1}) < record_epsilon(1.2, 1e-5, {(0.1, 130): 1})
    assert record_epsilon(0.0, 1e-5, {(0.1, 1): 1}) == math.inf and record_epsilon(1.0, 1e-5, {}) == 0.0


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, setting", [
    ({"noise_multiplier": -0.5}, "--dp.noise_multiplier"), ({"clip_norm": 0.0}, "--dp.clip_norm"),
    ({"delta": 1.0}, "--dp.delta"), ({"delta": 0.0}, "--dp.delta"), ({"target_epsilon": -1.0}, "--dp.target_epsilon"),
    ({"noise_multiplier": 1.0, "target_epsilon": 8.0}, "--dp.noise_multiplier and --dp.target_epsilon"),
])
def test_bad_dp_settings_are_one_line_naming_the_setting(kwargs, setting):
    with pytest.raises(FedPromptError) as err:
        DPArgs(**kwargs)
    assert str(err.value).startswith(setting) and "\n" not in str(err.value)


def test_bad_dp_flags_on_the_command_line(cli, tmp_path):
    for flags, setting in ((["--dp.noise_multiplier", "-1", "--dp.clip_norm", "1"], "--dp.noise_multiplier"),
                           (["--dp.noise_multiplier", "1"], "dp.clip_norm is not set"),
                           (["--dp.target_epsilon", "0.0001", "--dp.clip_norm", "1"], "dp.target_epsilon")):
        code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "x", *flags)
        assert code == 2
        assert setting in err.strip().splitlines()[-1], err
        assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.parametrize("method, why", [("LocalCoOp", "shares no trained state"),
                                         ("PFedMoAP", "per-client downloads"), ("FedMGP", "not a mean"),
                                         ("PromptSRC", "not a mean")])
def test_dp_refuses_methods_it_cannot_protect(cli, tmp_path, method, why):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--method", method,
                       "--dp.noise_multiplier", "1", "--dp.clip_norm", "1")
    assert code == 2 and why in err.strip().splitlines()[-1], err


# ------------------------------------------------------------------------------------------------ end to end
DP_FLAGS = ["--federation.fraction", "0.5", "--dp.noise_multiplier", "0.8", "--dp.clip_norm", "0.05",
            "--dp.adaptive_clipping", "true", "--dp.count_stddev", "1.0"]


def test_dp_run_reports_epsilon_every_round_and_resumes_exactly(cli, tmp_path):
    """Poisson sampling, clipping, server noise and adaptive clipping, interrupted after round 2: the resumed run
    equals the uninterrupted one (the noise is a function of the seed and the round; the clipping norm is in the
    checkpoint)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli("fit", "--config", SMOKE, "--out_dir", full, "--federation.rounds", "4", *DP_FLAGS)[0] == 0
    assert cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "2", *DP_FLAGS)[0] == 0
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "4", *DP_FLAGS,
                       "--resume", cut / "checkpoints" / "last.ckpt")
    assert code == 0, err
    rows = without_timings(read_rows(full))
    assert without_timings(read_rows(cut)) == rows
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(a["global"]["prompt.ctx"], b["global"]["prompt.ctx"])
    eps = [r["epsilon"] for r in rows]
    assert all(e > 0 for e in eps) and eps == sorted(eps) and len(set(eps)) == 4
    shape = RoundShape(4, 0.5, "poisson", 2, everyone_first=True)
    assert eps[-1] == pytest.approx(ClientAccountant(0.8, 1e-5, shape).epsilon(4))
    assert len({r["dp_clip_norm"] for r in rows}) == 4  # adapted every round
    assert rows[0]["clients"] == [0, 1, 2, 3]  # round 1: everyone (accounted as an unsampled round)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["epsilon"] == eps[-1] and summary["dp_noise_multiplier"] == 0.8


def test_target_epsilon_calibrates_the_noise_and_a_weak_guarantee_warns(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "a", "--dp.target_epsilon", "6",
                       "--dp.clip_norm", "0.1")
    assert code == 0, err
    rows = read_rows(tmp_path / "a")
    assert rows[-1]["epsilon"] == pytest.approx(6.0, rel=1e-3) and rows[-1]["epsilon"] <= 6.0
    assert "warning" not in err
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "b", "--dp.noise_multiplier", "0.5",
                       "--dp.clip_norm", "0.1")
    assert code == 0, err  # the run goes on
    warnings = [line for line in err.splitlines() if line.startswith("fedprompt: warning: dp:")]
    assert len(warnings) == 1 and "weak guarantee" in warnings[0], err
