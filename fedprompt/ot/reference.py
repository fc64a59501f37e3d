"""Slow, literal reference solvers (tests and benchmarks ONLY -- do not use in training code).

These reproduce the official FedOTP implementation (``trainers/GLP_OT.py``: ``Sinkhorn`` and
``entropic_COT_fast``) as closely as possible, deliberately keeping its inefficiencies:

* the plain Gibbs kernel ``K = exp(-C/eps)`` (no log-domain stabilisation: in fp32 it underflows for small ``eps``,
  e.g. ``eps = 0.01`` with costs near 2, and the iteration then produces inf/NaN);
* ``torch.diag_embed`` matrices (``diag(1/a) @ K``, ``diag(u) @ K @ diag(v)``: ``[B, M, M]`` temporaries);
* a ``.item()`` host synchronisation every iteration, with one stopping test for the *whole* batch
  (``mean |v - v_prev| < thresh`` for the partial solver, ``mean |u - u_prev| < thresh`` for the balanced one), so a
  problem's iteration count -- and hence its plan -- depends on the other problems in the batch.

The fast, stabilised, per-problem-exact solvers are in :mod:`fedprompt.ot.sinkhorn`. Here ``dtype`` selects the
working precision (default float32, as the official code runs it; ``torch.float64`` gives an exact-ish reference
usable down to ``eps = 0.01`` because ``exp(-200)`` is representable in float64).
"""

from __future__ import annotations

import torch

__all__ = ["reference_sinkhorn", "reference_partial_sinkhorn"]


def _flatten(cost, a, b, dtype):
    """Broadcast to one batch dim ``[B, M, N]`` / ``[B, M]`` / ``[B, N]`` (the official code is 3-D only)."""
    cost = cost.detach().to(dtype)
    M, N = cost.shape[-2:]
    a = torch.as_tensor(a, device=cost.device).detach().to(dtype)
    b = torch.as_tensor(b, device=cost.device).detach().to(dtype)
    batch = torch.broadcast_shapes(cost.shape[:-2], a.shape[:-1], b.shape[:-1])
    cost = cost.expand(*batch, M, N).reshape(-1, M, N)
    a = a.expand(*batch, M).reshape(-1, M)
    b = b.expand(*batch, N).reshape(-1, N)
    return cost, a, b, batch


@torch.no_grad()
def reference_partial_sinkhorn(cost, a, b, eps, max_iter=100, tol=1e-3, dtype=torch.float32):
    """Literal FedOTP ``entropic_COT_fast``: ``u = min(a/(Kv), 1)``, ``v = b/(K^T u)``, ``T = diag(u) K diag(v)``.

    Shapes as in :func:`fedprompt.ot.partial_sinkhorn` (``cost [..., M, N]``, ``a [..., M]|[M]``,
    ``b [..., N]|[N]``); returns ``[..., M, N]`` plans in ``dtype``. Stops when ``mean |v - v_prev|`` over the whole
    batch is below ``tol`` (checked with ``.item()`` every iteration) or after ``max_iter`` iterations.
    Reference for tests/benchmarks only.
    """
    cost, a, b, batch = _flatten(cost, a, b, dtype)
    K = torch.exp(cost / (-eps))
    dx = torch.ones_like(a)
    dy = torch.ones_like(b)
    Kp = torch.matmul(torch.diag_embed(1 / a, dim1=1), K)
    Kq = torch.matmul(torch.diag_embed(1 / b, dim1=1), K.permute(0, 2, 1))
    u, v = dx, dy
    cpt = 0
    while cpt < max_iter:
        v0 = v
        temp = torch.div(dx, torch.matmul(Kp, v.unsqueeze(-1)).squeeze(-1))
        u = torch.minimum(temp, dx)
        v = torch.div(dy, torch.matmul(Kq, u.unsqueeze(-1)).squeeze(-1))
        cpt += 1
        err = (v - v0).abs().mean()
        if err.item() < tol:
            break
    T = torch.matmul(torch.diag_embed(u, dim1=1), K)
    T = torch.matmul(T, torch.diag_embed(v, dim1=1))
    return T.reshape(*batch, *T.shape[-2:])


@torch.no_grad()
def reference_sinkhorn(cost, a, b, eps, max_iter=100, tol=1e-3, dtype=torch.float32):
    """Literal FedOTP ``Sinkhorn`` (balanced): ``r = a/(K c)``, ``c = b/(K^T r)``, ``T = r c^T * K``.

    Shapes as in :func:`fedprompt.ot.sinkhorn`; returns ``[..., M, N]`` plans in ``dtype``. Stops when
    ``mean |r - r_prev|`` over the whole batch is below ``tol`` (``.item()`` every iteration) or after
    ``max_iter`` iterations. Reference for tests/benchmarks only.
    """
    cost, a, b, batch = _flatten(cost, a, b, dtype)
    K = torch.exp(cost / (-eps))
    r = torch.ones_like(a)
    c = torch.ones_like(b)
    for _ in range(max_iter):
        r0 = r
        r = a / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = b / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        err = (r - r0).abs().mean()
        if err.item() < tol:
            break
    T = torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K
    return T.reshape(*batch, *T.shape[-2:])
