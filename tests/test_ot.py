"""Tests for fedprompt.ot: batched log-domain Sinkhorn (balanced and FedOTP partial) against POT and references."""

from __future__ import annotations

import sys

import numpy as np
import ot
import ot.partial
import pytest
import torch

from fedprompt.ot import partial_sinkhorn, sinkhorn, transport_plan, uniform_plan
from fedprompt.ot.reference import reference_partial_sinkhorn, reference_sinkhorn

KERNEL_SAFE_RANGE = sys.modules["fedprompt.ot.sinkhorn"].KERNEL_SAFE_RANGE  # the module is shadowed by the function

GAMMA = 0.8
ATOL = 1e-5  # plans vs float64 references (absolute, fp32)
TIGHT = dict(max_iter=20000, tol=1e-8)  # run our solvers to convergence


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one intra-op thread is faster and immune to oversubscription on shared CI machines."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _problem(B, M, N, lo=0.0, hi=2.0, seed=0, random_marginals=False, gamma=GAMMA):
    """Costs in [lo, hi] (as 1 - cosine), patch marginal a [B, M] (sum 1), prompt marginal b [B, N] (sum gamma)."""
    g = torch.Generator().manual_seed(seed)
    cost = lo + (hi - lo) * torch.rand(B, M, N, generator=g, dtype=torch.float64)
    if random_marginals:
        a = 0.5 + torch.rand(B, M, generator=g, dtype=torch.float64)
        b = 0.5 + torch.rand(B, N, generator=g, dtype=torch.float64)
    else:
        a = torch.ones(B, M, dtype=torch.float64)
        b = torch.ones(B, N, dtype=torch.float64)
    a = a / a.sum(-1, keepdim=True)
    b = gamma * b / b.sum(-1, keepdim=True)
    return cost, a, b


def _pot_partial(cost, a, b, eps):
    """POT's entropic partial OT (Dykstra, float64), one problem at a time, mass m = sum(b)."""
    out = []
    for c, ai, bi in zip(cost.numpy(), a.numpy(), b.numpy()):
        out.append(
            ot.partial.entropic_partial_wasserstein(ai, bi, c, reg=eps, m=bi.sum(), numItermax=20000, stopThr=1e-13)
        )
    return torch.from_numpy(np.stack(out))


def _pot_balanced(cost, a, b, eps, method="sinkhorn"):
    """POT's ot.sinkhorn (float64), one problem at a time."""
    out = []
    for c, ai, bi in zip(cost.numpy(), a.numpy(), b.numpy()):
        out.append(ot.sinkhorn(ai, bi, c, eps, method=method, numItermax=20000, stopThr=1e-13))
    return torch.from_numpy(np.stack(out))


def _close(plan, ref, atol=ATOL):
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all()
    err = (plan.double() - ref.double()).abs().max().item()
    assert err <= atol, f"max abs difference {err:.3e} > {atol}"


SHAPES = [(4, 49, 2), (2, 196, 4), (3, 196, 3)]


# ----------------------------------------------------------------------------------------------------------- balanced
@pytest.mark.parametrize("B,M,N", SHAPES)
@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_balanced_matches_pot(B, M, N, eps):
    cost, a, b = _problem(B, M, N, seed=M + N)
    b = b / GAMMA  # balanced: equal masses
    plan = sinkhorn(cost.float(), a.float(), b.float(), eps, **TIGHT)
    _close(plan, _pot_balanced(cost, a, b, eps))
    if hasattr(ot, "batch"):  # POT >= 0.9.6: batched log-domain Sinkhorn
        res = ot.batch.solve_batch(cost.numpy(), reg=eps, a=a.numpy(), b=b.numpy(), max_iter=20000, tol=1e-12,
                                   method="log_sinkhorn")
        _close(plan, torch.from_numpy(np.asarray(res.plan)))


def test_balanced_random_marginals_and_broadcast_marginals():
    cost, a, b = _problem(3, 49, 3, seed=1, random_marginals=True, gamma=1.0)
    _close(sinkhorn(cost, a, b, 0.1, **TIGHT), _pot_balanced(cost, a, b, 0.1))
    # a [M] and b [N] shared by the whole batch (the FedOTP case).
    a1 = torch.full((49,), 1 / 49, dtype=torch.float64)
    b1 = torch.full((3,), 1 / 3, dtype=torch.float64)
    plan = sinkhorn(cost.float(), a1.float(), b1.float(), 0.1, **TIGHT)
    ref = _pot_balanced(cost, a1.expand(3, 49), b1.expand(3, 3), 0.1)
    _close(plan, ref)


# ------------------------------------------------------------------------------------------------------------ partial
@pytest.mark.parametrize("B,M,N", SHAPES)
@pytest.mark.parametrize("eps", [0.1, 0.05])
@pytest.mark.parametrize("random_marginals", [False, True])
def test_partial_matches_pot(B, M, N, eps, random_marginals):
    cost, a, b = _problem(B, M, N, seed=M * N, random_marginals=random_marginals)
    plan = partial_sinkhorn(cost.float(), a.float(), b.float(), eps, **TIGHT)
    _close(plan, _pot_partial(cost, a, b, eps))


def test_fedotp_rule_is_dykstra_not_naive_projection():
    """The literal FedOTP update u = min(a/(Kv), 1) converges to POT's plan; naive cyclic projection does not."""
    rng = np.random.default_rng(0)
    naive_gap = 0.0
    for M, N, eps in [(5, 3, 0.1), (10, 2, 0.5), (7, 4, 1.0)]:
        C = rng.uniform(0, 2, (M, N))
        a, b = np.full(M, 1 / M), np.full(N, GAMMA / N)
        ref = ot.partial.entropic_partial_wasserstein(a, b, C, reg=eps, m=GAMMA, numItermax=50000, stopThr=1e-15)
        K = np.exp(-C / eps)
        v = np.ones(N)
        for _ in range(5000):  # literal FedOTP rule (float64)
            u = np.minimum(a / (K @ v), 1.0)
            v = b / (K.T @ u)
        assert np.abs(u[:, None] * K * v[None] - ref).max() < 1e-10
        T = K.copy()
        for _ in range(5000):  # KL projections without Dykstra corrections
            T *= np.minimum(1.0, a / T.sum(1))[:, None]
            T *= (b / T.sum(0))[None]
        naive_gap = max(naive_gap, np.abs(T - ref).max())
    assert naive_gap > 1e-3


@pytest.mark.parametrize("kind", ["balanced", "unbalanced"])
def test_marginals(kind):
    cost, a, b = _problem(8, 196, 2, seed=3, random_marginals=True)
    if kind == "balanced":
        b = b / GAMMA
    plan = transport_plan(cost, a, b, kind=kind, eps=0.05, max_iter=5000, tol=1e-7).double()
    rows, cols = plan.sum(-1), plan.sum(-2)
    assert (plan >= 0).all()
    assert (cols - b).abs().max() < 1e-6
    assert (rows - a).max() <= 1e-6
    assert plan.sum((-2, -1)).sub(b.sum(-1)).abs().max() < 1e-6  # transported mass gamma
    if kind == "balanced":
        assert (rows - a).abs().max() <= 1e-6
    else:  # partial: some patches are not fully used (inequality active), yet the mass is exactly gamma
        assert (rows < a - 1e-4).any()


# --------------------------------------------------------------------------------------------- small eps, underflow
def test_eps_001_plain_kernel_underflows_but_solver_is_exact():
    eps = 0.01
    cost, a, b = _problem(3, 49, 2, lo=1.05, hi=2.0, seed=7)  # every cost >= 1.05: exp(-105) < fp32 min subnormal
    cost32 = cost.float()
    assert (torch.exp(-cost32 / eps) == 0).all(), "the plain fp32 kernel should underflow to all zeros here"
    # The literal (plain-kernel) solver breaks down in fp32 ...
    assert not torch.isfinite(reference_partial_sinkhorn(cost32, a.float(), b.float(), eps)).all()
    # ... the log-domain solvers stay finite and match float64 references (POT, literal rule in float64).
    plan = partial_sinkhorn(cost32, a.float(), b.float(), eps, **TIGHT)
    _close(plan, _pot_partial(cost, a, b, eps))
    ref64 = reference_partial_sinkhorn(cost, a, b, eps, max_iter=3000, tol=0.0, dtype=torch.float64)
    _close(plan, ref64)
    bb = b / GAMMA
    plan_b = sinkhorn(cost32, a.float(), bb.float(), eps, **TIGHT)
    _close(plan_b, _pot_balanced(cost, a, bb, eps))
    _close(plan_b, _pot_balanced(cost, a, bb, eps, method="sinkhorn_log"))


@pytest.mark.parametrize("B,M,N", [(3, 49, 2), (2, 196, 4)])
def test_eps_001_random_costs(B, M, N):
    eps = 0.01
    cost, a, b = _problem(B, M, N, seed=11 + N)
    plan = partial_sinkhorn(cost.float(), a.float(), b.float(), eps, **TIGHT)
    _close(plan, _pot_partial(cost, a, b, eps))
    assert (plan.sum(-2) - b).abs().max() < 1e-6
    bb = b / GAMMA
    _close(sinkhorn(cost.float(), a.float(), bb.float(), eps, **TIGHT), _pot_balanced(cost, a, bb, eps))


# ------------------------------------------------------------------------------------ batching / stopping semantics
@pytest.mark.parametrize("solver", [partial_sinkhorn, sinkhorn])
def test_batched_equals_per_problem(solver):
    # Mix easy and hard problems (eps 0.01 with narrow and wide cost ranges) so they converge at different checks.
    g = torch.Generator().manual_seed(5)
    M, N = 49, 3
    width = torch.tensor([0.05, 2.0, 0.5, 1.0, 0.1, 2.0]).view(-1, 1, 1)
    cost = 1.0 - width / 2 + width * torch.rand(6, M, N, generator=g)
    a = torch.full((M,), 1 / M)
    b = torch.full((N,), (GAMMA if solver is partial_sinkhorn else 1.0) / N)
    kw = dict(eps=0.01, max_iter=2000, tol=1e-4)
    plan, n_iter = solver(cost, a, b, return_n_iter=True, **kw)
    assert len(set(n_iter.tolist())) > 1, "test needs problems converging at different iterations"
    for i in range(cost.shape[0]):
        single, n_single = solver(cost[i], a, b, return_n_iter=True, **kw)
        assert int(n_single) == int(n_iter[i])
        torch.testing.assert_close(plan[i], single, rtol=0, atol=1e-7)
    # No early exit (no host sync at all): identical plans.
    torch.testing.assert_close(solver(cost, a, b, early_exit=False, **kw), plan, rtol=0, atol=0)
    # Several leading batch dims with per-problem marginals.
    plan4 = solver(cost.view(2, 3, M, N), a.expand(2, 3, M), b.expand(2, 3, N), **kw)
    assert plan4.shape == (2, 3, M, N)
    torch.testing.assert_close(plan4.reshape(6, M, N), plan, rtol=0, atol=1e-7)


@pytest.mark.parametrize("solver", [partial_sinkhorn, sinkhorn])
def test_kernel_fast_path_matches_log_domain(solver):
    """The plain-kernel fast path (used where (max C - min C)/eps <= KERNEL_SAFE_RANGE) equals the log path."""
    g = torch.Generator().manual_seed(12)
    M, N = 196, 2
    # eps 0.01: ranges 0.05 .. 0.3 are safe (R = 5 .. 30), 0.6 and 2.0 are not (R = 60, 200): a mixed batch.
    width = torch.tensor([0.05, 0.3, 0.6, 0.2, 2.0, 0.1]).view(-1, 1, 1)
    cost = 0.5 + width * torch.rand(6, M, N, generator=g)
    R = (cost.amax((-2, -1)) - cost.amin((-2, -1))) / 0.01
    assert (R <= KERNEL_SAFE_RANGE).any() and (R > KERNEL_SAFE_RANGE).any()
    a = torch.rand(6, M, generator=g) + 0.1
    a = a / a.sum(-1, keepdim=True)
    b = torch.full((N,), (GAMMA if solver is partial_sinkhorn else 1.0) / N)
    kw = dict(eps=0.01, max_iter=3000, tol=1e-6, return_n_iter=True)
    fast, n_fast = solver(cost, a, b, fast_path=True, **kw)
    slow, n_slow = solver(cost, a, b, fast_path=False, **kw)
    # Same math, different fp32 rounding: a problem whose error is within rounding of tol at a check may stop one
    # check (10 iterations) earlier or later, which moves its plan by about tol.
    assert (n_fast - n_slow).abs().max() <= 10 and (n_fast == n_slow).float().mean() >= 0.5
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6)
    # all-safe batch (FedOTP's eps = 0.1 with costs in [0, 2]) against POT
    cost2, a2, b2 = _problem(3, 49, 3, seed=21)
    b2 = b2 if solver is partial_sinkhorn else b2 / GAMMA
    ref = _pot_partial(cost2, a2, b2, 0.1) if solver is partial_sinkhorn else _pot_balanced(cost2, a2, b2, 0.1)
    _close(solver(cost2.float(), a2.float(), b2.float(), 0.1, fast_path=True, **TIGHT), ref)


@pytest.mark.parametrize("solver", [partial_sinkhorn, sinkhorn, uniform_plan])
def test_low_precision_input_fp32_output_no_grad(solver):
    cost, a, b = _problem(4, 49, 2, seed=2)
    c16 = cost.to(torch.bfloat16).requires_grad_(True)
    kw = {} if solver is uniform_plan else dict(eps=0.05, max_iter=2000, tol=1e-7)
    plan = solver(c16, a.to(torch.bfloat16), b.to(torch.float16), **kw)
    assert plan.dtype == torch.float32 and not plan.requires_grad and plan.grad_fn is None
    assert torch.isfinite(plan).all()
    ref = solver(c16.detach().float(), a.to(torch.bfloat16).float(), b.to(torch.float16).float(), **kw)
    torch.testing.assert_close(plan, ref, rtol=0, atol=0)
    # fp16 cost with grad as well, through transport_plan
    c_half = cost.half().requires_grad_(True)
    out = transport_plan(c_half, a, b, kind="unbalanced", eps=0.1)
    assert out.dtype == torch.float32 and not out.requires_grad


# ---------------------------------------------------------------------------------------------- slow reference port
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_slow_reference(dtype):
    eps = 0.1
    cost, a, b = _problem(5, 196, 2, seed=9)
    ref_p = reference_partial_sinkhorn(cost, a, b, eps, max_iter=3000, tol=0.0, dtype=dtype)
    _close(partial_sinkhorn(cost.float(), a.float(), b.float(), eps, **TIGHT), ref_p)
    bb = b / GAMMA
    ref_b = reference_sinkhorn(cost, a, bb, eps, max_iter=3000, tol=0.0, dtype=dtype)
    _close(sinkhorn(cost.float(), a.float(), bb.float(), eps, **TIGHT), ref_b)


@pytest.mark.parametrize("lo,hi,eps", [(0.0, 2.0, 0.1), (0.6, 0.9, 0.01), (0.0, 2.0, 0.05)])
@pytest.mark.parametrize("fast_path", [True, False])
def test_same_iterates_as_official_code(lo, hi, eps, fast_path):
    """After k iterations (converged or not) the plan equals the literal FedOTP iteration's (float64 port)."""
    cost, a, b = _problem(4, 196, 2, lo=lo, hi=hi, seed=13)
    bb = b / GAMMA
    for k in (1, 5, 100):
        p = partial_sinkhorn(cost, a, b, eps, max_iter=k, tol=0.0, fast_path=fast_path)
        _close(p, reference_partial_sinkhorn(cost, a, b, eps, max_iter=k, tol=0.0, dtype=torch.float64), atol=1e-6)
        p = sinkhorn(cost, a, bb, eps, max_iter=k, tol=0.0, fast_path=fast_path)
        _close(p, reference_sinkhorn(cost, a, bb, eps, max_iter=k, tol=0.0, dtype=torch.float64), atol=1e-6)


def test_reference_with_fedotp_defaults_is_close_to_converged_plan():
    """With FedOTP's defaults (eps 0.1, thresh 1e-3, 100 its) the slow reference and ours agree to about tol."""
    cost, a, b = _problem(8, 49, 2, lo=0.6, hi=0.9, seed=4)  # realistic CLIP cost range
    ours = partial_sinkhorn(cost, a[0], b[0], 0.1)  # defaults: max_iter 100, tol 1e-3
    ref = reference_partial_sinkhorn(cost, a[0], b[0], 0.1)
    assert (ours.double() - ref.double()).abs().sum((-2, -1)).max() < 2e-3


# ------------------------------------------------------------------------------------------- uniform / dispatcher
def test_uniform_plan():
    cost, a, b = _problem(3, 196, 2, seed=0)
    plan = uniform_plan(cost, a[0], b[0])
    assert plan.shape == cost.shape and plan.dtype == torch.float32
    torch.testing.assert_close(plan, torch.full_like(plan, GAMMA / (196 * 2)))
    cost, a, b = _problem(3, 49, 3, seed=0, random_marginals=True)
    plan = uniform_plan(cost, a, b).double()
    torch.testing.assert_close(plan.sum(-2), b)  # column marginal exactly b
    torch.testing.assert_close(plan.sum(-1), a * GAMMA)  # rows a * sum(b)/sum(a) <= a
    torch.testing.assert_close(transport_plan(cost, a, b, kind="uniform").double(), plan)


def test_transport_plan_dispatch():
    cost, a, b = _problem(2, 49, 2, seed=8)
    torch.testing.assert_close(
        transport_plan(cost, a, b, kind="unbalanced", eps=0.1, max_iter=50, tol=1e-4),
        partial_sinkhorn(cost, a, b, 0.1, max_iter=50, tol=1e-4),
    )
    torch.testing.assert_close(
        transport_plan(cost, a, b / GAMMA, kind="balanced", eps=0.1, max_iter=50, tol=1e-4),
        sinkhorn(cost, a, b / GAMMA, 0.1, max_iter=50, tol=1e-4),
    )


def test_transport_plan_rejects_unknown_kind():
    cost, a, b = _problem(1, 4, 2)
    with pytest.raises(ValueError, match="'sinkhorn_log'") as exc:
        transport_plan(cost, a, b, kind="sinkhorn_log")
    for allowed in ("unbalanced", "balanced", "uniform"):
        assert allowed in str(exc.value)


def test_bad_shapes_and_eps_raise():
    cost, a, b = _problem(1, 4, 2)
    with pytest.raises(ValueError, match="M = 4"):
        partial_sinkhorn(cost, a[..., :3], b, 0.1)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(cost, a, b / GAMMA, 0.0)
