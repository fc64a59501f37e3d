"""The privacy accountants: what epsilon a run has spent, from dp-accounting's RDP accountant.

**Accounting** (:class:`ClientAccountant`) uses dp-accounting's RDP accountant: one
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per round (``GaussianDpEvent(z)`` when every client trains, e.g.
round 1 with ``federation.all_clients_first_round``), and epsilon at ``dp.delta`` after every round goes to the
metrics row (``epsilon``). :func:`calibrate_noise_multiplier` finds ``z`` for a target epsilon with
``dp_accounting.calibrate_dp_mechanism``.

**Record-level accounting** (:func:`record_epsilon`) is for methods that add noise in every local step
(DP-FPL): each local step of client ``k`` is one ``PoissonSampledDpEvent(b / n_k, GaussianDpEvent(z))``; the
metrics row reports ``record_epsilon``, the largest epsilon over the clients.

The server's DP-FedAvg rule that these account for is :mod:`fedprompt.federation.privacy`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

from fedprompt.errors import FedPromptError
from fedprompt.federation.feed import local_steps_per_round

#: the largest noise multiplier a target epsilon is calibrated to (the noise std on the clients' update sum is z
#: times the clipping norm, while each update has at most that norm in all its coordinates together)
MAX_NOISE_MULTIPLIER = 1e4


def _dp_accounting():
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise FedPromptError("dp: differential privacy needs the dp-accounting package: pip install "
                             "'fedprompt[dp]'.") from None
    # dp-accounting logs a warning through absl for every low RDP order whose series does not converge (it leaves
    # that order out of the minimum, which stays a valid bound): one line per order and call would flood the log
    logging.getLogger("absl").setLevel(logging.ERROR)
    return dp_accounting, rdp


@functools.lru_cache(maxsize=512)
def _event_rdp(kind: str, noise_multiplier: float, rate: float = 1.0, population: int = 0,
               sample: int = 0) -> tuple[tuple, tuple]:
    """(orders, RDP) of one mechanism application under dp-accounting's RDP accountant (its default orders):
    ``gaussian``, ``poisson`` (``PoissonSampledDpEvent``, add/remove-one) or ``fixed``
    (``SampledWithoutReplacementDpEvent``, replace-one). Cached: the RDP of ``T`` applications is ``T`` times it,
    which is how the accountant composes them, so the epsilon after every round costs no new series evaluation
    (dp-accounting takes seconds for some (q, z) pairs)."""
    dp_accounting, rdp = _dp_accounting()
    relation = dp_accounting.NeighboringRelation
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if kind == "gaussian":
        event, neighbors = gaussian, relation.ADD_OR_REMOVE_ONE
    elif kind == "poisson":
        event, neighbors = dp_accounting.PoissonSampledDpEvent(rate, gaussian), relation.ADD_OR_REMOVE_ONE
    else:
        event = dp_accounting.SampledWithoutReplacementDpEvent(population, sample, gaussian)
        neighbors = relation.REPLACE_ONE
    accountant = rdp.RdpAccountant(neighboring_relation=neighbors).compose(event)
    return tuple(accountant._orders.tolist()), tuple(accountant._rdp.tolist())  # (dp-accounting's own arrays)


def _epsilon(parts: list[tuple[tuple, int]], delta: float) -> float:
    """Epsilon at ``delta`` of ``parts``: (the ``_event_rdp`` of a mechanism, how many times it ran)."""
    _, rdp = _dp_accounting()
    parts = [(event, count) for event, count in parts if count > 0]
    if not parts:
        return 0.0
    orders = np.asarray(parts[0][0][0])
    total = sum(count * np.asarray(event[1]) for event, count in parts)
    return float(rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


@dataclass(frozen=True)
class RoundShape:
    """What the accountant needs about the rounds: ``num_clients`` K, the sampling ``rate`` q of a round (1: every
    client), ``sampling`` (``poisson`` or ``fixed``), ``sample_size`` (fixed-size sampling), and whether round 1
    takes every client (``everyone_first``)."""

    num_clients: int
    rate: float
    sampling: str = "poisson"
    sample_size: int = 0
    everyone_first: bool = False

    @property
    def replace_one(self) -> bool:
        return self.sampling == "fixed" and self.rate < 1

    def denominator(self, round_idx: int) -> float:
        """The fixed denominator m of the round: the expected number of its clients."""
        if self.rate >= 1 or (round_idx == 1 and self.everyone_first):
            return float(self.num_clients)
        return float(self.sample_size) if self.sampling == "fixed" else self.rate * self.num_clients


class ClientAccountant:
    """Client-level epsilon of DP-FedAvg after a number of rounds (dp-accounting's RDP accountant).

    Args:
        noise_multiplier: z (the total one, with adaptive clipping).
        delta: the delta at which epsilon is read.
        shape: the rounds' sampling (:class:`RoundShape`).
    """

    def __init__(self, noise_multiplier: float, delta: float, shape: RoundShape):
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.shape = shape

    def events(self, noise_multiplier: float, rounds: int):
        """The DpEvent of ``rounds`` rounds at ``noise_multiplier``."""
        dp_accounting, _ = _dp_accounting()
        shape = self.shape
        # replace-one: replacing one client moves the clipped sum by up to 2 S
        z = noise_multiplier / 2 if shape.replace_one else noise_multiplier
        gaussian = dp_accounting.GaussianDpEvent(z)
        if shape.rate >= 1:
            return dp_accounting.SelfComposedDpEvent(gaussian, rounds)
        if shape.sampling == "fixed":
            sampled = dp_accounting.SampledWithoutReplacementDpEvent(shape.num_clients, shape.sample_size, gaussian)
        else:
            sampled = dp_accounting.PoissonSampledDpEvent(shape.rate, gaussian)
        first = 1 if shape.everyone_first and rounds >= 1 else 0
        parts = [dp_accounting.GaussianDpEvent(z)] * first
        if rounds > first:  # (a count of 0 times an order whose RDP is infinite would make NaN)
            parts.append(dp_accounting.SelfComposedDpEvent(sampled, rounds - first))
        return dp_accounting.ComposedDpEvent(parts)

    def fresh(self):
        dp_accounting, rdp = _dp_accounting()
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if self.shape.replace_one
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        return rdp.RdpAccountant(neighboring_relation=relation)

    def epsilon(self, rounds: int, noise_multiplier: float | None = None) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (``inf`` without noise, 0 before any round); the same as
        composing :meth:`events` in a fresh accountant, from cached per-round RDP (:func:`_event_rdp`)."""
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if rounds <= 0:
            return 0.0
        if z <= 0:
            return math.inf
        shape = self.shape
        z_event = z / 2 if shape.replace_one else z
        if shape.rate >= 1:
            return _epsilon([(_event_rdp("gaussian", z_event), rounds)], self.delta)
        if shape.sampling == "fixed":
            sampled = _event_rdp("fixed", z_event, population=shape.num_clients, sample=shape.sample_size)
        else:
            sampled = _event_rdp("poisson", z_event, rate=shape.rate)
        first = _event_rdp("gaussian", z_event)  # (the Gaussian's RDP is the same under either relation)
        everyone = 1 if shape.everyone_first else 0
        return _epsilon([(first, everyone), (sampled, rounds - everyone)], self.delta)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int, shape: RoundShape) -> float:
    """The smallest noise multiplier z (within 1e-6) whose epsilon at ``delta`` after ``rounds`` rounds is at most
    ``target_epsilon`` (``dp_accounting.calibrate_dp_mechanism``); one :class:`FedPromptError` line naming
    ``dp.target_epsilon`` when none is found."""
    dp_accounting, _ = _dp_accounting()
    accountant = ClientAccountant(1.0, delta, shape)
    unreachable = FedPromptError(
        f"dp.target_epsilon: {target_epsilon:g} at delta {delta:g} cannot be reached in {rounds} rounds with a noise "
        f"multiplier up to {MAX_NOISE_MULTIPLIER:g} (beyond it the noise drowns every update); raise "
        "dp.target_epsilon or dp.delta, or train fewer rounds.")
    if accountant.epsilon(rounds, MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise unreachable
    try:
        z = dp_accounting.calibrate_dp_mechanism(accountant.fresh, lambda value: accountant.events(value, rounds),
                                                 target_epsilon, delta)
    except Exception:  # noqa: BLE001 - dp-accounting raises several kinds when no noise reaches the target
        raise unreachable from None
    if not math.isfinite(z) or accountant.epsilon(rounds, z) > target_epsilon * (1 + 1e-9):
        raise unreachable
    return float(z)


def record_epsilon(noise_multiplier: float, delta: float, participation: dict[tuple[float, int], int]) -> float:
    """Record-level epsilon of per-step noise (DP-SGD): the largest over the clients, each of whose local steps is
    one ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``; ``participation`` maps (q, steps) to the number of clients
    in that situation. 0 before any step; ``inf`` without noise."""
    if not participation or all(steps == 0 for _, steps in participation):
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    worst = 0.0
    for (rate, steps) in participation:
        event = (_event_rdp("gaussian", noise_multiplier) if rate >= 1
                 else _event_rdp("poisson", noise_multiplier, rate=rate))
        worst = max(worst, _epsilon([(event, steps)], delta))
    return worst


def record_privacy_row(record: tuple[float, float], rounds_trained: dict[int, int], sizes: list[int], train) -> dict:
    """``record_epsilon`` of a method that adds record-level noise in every local step (``method.record_privacy``:
    its noise multiplier and delta): the largest over the clients, counting every local step each client took in
    the rounds it trained in so far (``rounds_trained``, from the sampler: a function of the seeds and sizes only,
    so it needs no checkpoint) with sampling rate ``batch_size / n_k``."""
    z, delta = record
    participation: dict[tuple[float, int], int] = {}
    for cid, count in rounds_trained.items():
        n = sizes[cid]
        if n == 0:
            continue
        steps = count * local_steps_per_round(n, train.batch_size, train.local_epochs, train.local_steps)
        key = (min(1.0, train.batch_size / n), steps)
        participation[key] = participation.get(key, 0) + 1
    return {"record_epsilon": record_epsilon(z, delta, participation)}
