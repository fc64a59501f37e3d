"""Differential privacy in the federation: client-level DP-FedAvg and the accountants.

**Client-level DP** (DP-FedAvg, McMahan, Ramage, Talwar, Zhang, ICLR 2018), built by :func:`build_private_aggregator`
from the ``dp`` settings (:class:`fedprompt.args.DPArgs`) around a method's aggregator (:class:`PrivateAggregator`).
Each round, for the clients that uploaded:

1. ``delta_k`` = the client's upload minus the global state the round started from (the shared tensors only; a key
   the global state lacks counts from zero), clipped to the L2 bound ``S`` over all its tensors together
   (:func:`clip_update`);
2. the server's new global state is ``global + sum_k delta_k / m + N(0, (z S / m)^2)`` per entry, with the
   **uniform** sum over the **fixed** denominator ``m``, the expected number of clients of the round (``q K`` with
   Poisson sampling at rate ``q``; the sample size with fixed-size sampling; ``K`` when everyone trains): data-size
   weights would under-calibrate the noise (Flower's wrappers inherit FedAvg's weighting);
3. the noise is drawn from a generator seeded with the run seed and the round only (:func:`noise_seed`), so every
   process draws the same noise and a resumed run the same as an uninterrupted one.

With ``federation.fraction < 1`` the clients of a round are drawn by **Poisson sampling** (each independently with
probability ``q``; :func:`poisson_sample`), which the add/remove-one bound assumes; ``dp.sampling: fixed`` keeps the
usual fixed-size sample and accounts it with the replace-one bound of sampling without replacement (replacing one
client moves the clipped sum by up to ``2 S``, so the mechanism's noise multiplier there is ``z / 2``). The server
aggregates and noises also a round in which no client was sampled (``aggregates_empty_rounds``).

**Adaptive clipping** (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021; the reference is TensorFlow Privacy's
``QuantileEstimatorQuery``): with ``b_k = 1[||delta_k|| <= S_t]`` (the update was *not* clipped), the server
releases ``b = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2`` and sets ``S_{t+1} = S_t exp(-eta (b - gamma))``;
the updates of round t are noised with the ``S_t`` they were clipped to, with the noise multiplier
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that the pair (update, count) has the total noise multiplier ``z``
the accountant counts. Flower's variant differs in three ways that this one does not copy: it feeds the *clipped*
fraction into the same formula (the clipping norm then runs away from the target quantile), noises with
``S_{t+1}`` instead of ``S_t``, and counts 0/1 bits without the 1/2 shift while splitting the budget as if it had
it.

**Accounting** (epsilon after every round, the calibration of ``z`` for a target epsilon, and the record-level
epsilon of DP-FPL) is :mod:`fedprompt.federation.accounting`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedprompt.errors import FedPromptError, warn
from fedprompt.federation.accounting import ClientAccountant, RoundShape, calibrate_noise_multiplier
from fedprompt.federation.aggregators import Aggregator, WrappingAggregator
from fedprompt.federation.sampling import derive_seed

State = dict[str, torch.Tensor]

#: separates the server's DP noise stream from every other stream derived from the run seed
NOISE_STREAM = 0x44504E4F
#: and the adaptive-clipping count noise from the update noise
COUNT_STREAM = 0x44504354
#: Poisson client sampling's stream
POISSON_STREAM = 0x44505053
#: above this epsilon a guarantee is called weak (one warning line; the run goes on)
WEAK_EPSILON = 10.0


# ------------------------------------------------------------------------------------------------- mechanics
def flat_norm(tensors: State) -> float:
    """The L2 norm over every entry of every tensor of ``tensors`` together (float64)."""
    total = sum(float(t.to(torch.float64).pow(2).sum()) for t in tensors.values())
    return math.sqrt(total)


def clip_update(delta: State, clip_norm: float) -> tuple[State, float]:
    """``delta`` scaled by ``min(1, clip_norm / ||delta||)`` (the flat L2 norm over all its tensors, float64), and
    that norm. A zero update stays zero."""
    norm = flat_norm(delta)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: v.to(torch.float64) * scale for k, v in delta.items()}, norm


def noise_seed(seed: int, round_idx: int, stream: int = NOISE_STREAM) -> int:
    """The seed of the server's noise in ``round_idx``: a function of the run seed and the round only."""
    return derive_seed(seed, round_idx, stream)


def gaussian_noise(template: State, std: float, seed: int) -> State:
    """``N(0, std^2)`` per entry, float64 on the CPU, one tensor per key of ``template`` (drawn in sorted key order
    from one generator seeded with ``seed``: identical on every process)."""
    generator = torch.Generator().manual_seed(int(seed))
    return {k: torch.randn(template[k].shape, generator=generator, dtype=torch.float64) * std
            for k in sorted(template)}


def poisson_sample(num_clients: int, rate: float, seed: int, round_idx: int) -> list[int]:
    """Poisson client sampling: every client takes part independently with probability ``rate`` (a pure function of
    the seed and the round; the sample may be empty)."""
    rng = np.random.default_rng([seed, round_idx, POISSON_STREAM])
    return np.flatnonzero(rng.random(num_clients) < rate).tolist()


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Adaptive clipping: the noise multiplier of the update, ``(z^-2 - (2 sigma_b)^-2)^(-1/2)``, so that the update
    and the unclipped count (sensitivity 1/2, noise ``sigma_b``) together have noise multiplier ``z``."""
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise FedPromptError(f"dp.count_stddev: {count_stddev:g} leaves no noise budget for the update at "
                             f"dp.noise_multiplier {noise_multiplier:g} (adaptive clipping needs count_stddev > "
                             f"noise_multiplier / 2 = {noise_multiplier / 2:g}); raise dp.count_stddev or sample "
                             "more clients per round.")
    return rest ** -0.5


# ------------------------------------------------------------------------------------------------ the server
class PrivateAggregator(WrappingAggregator):
    """A method's aggregator with DP-FedAvg's merge rule (see the module docstring): ``upload``, ``download`` and
    ``apply`` are the method's; ``aggregate`` (and the reduce path's ``partial_sum`` / ``finish``) is the clipped,
    uniform, noised mean of the updates; ``sample`` draws Poisson samples; the state (the inner aggregator's, the
    adaptive clipping norm) is checkpointed.

    Args:
        inner: the method's aggregator (it must declare ``averages_uploads``).
        noise_multiplier: z.
        clip_norm: S (the initial S_0 with adaptive clipping).
        delta: for the reported epsilon.
        shape: the rounds' sampling (:class:`RoundShape`).
        adaptive: adaptive clipping (Andrew et al.).
        target_quantile, clip_lr, count_stddev: its gamma, eta and sigma_b.
    """

    aggregates_empty_rounds = True
    averages_uploads = True

    def __init__(self, inner: Aggregator, noise_multiplier: float, clip_norm: float, delta: float,
                 shape: RoundShape, adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_stddev: float | None = None):
        super().__init__(inner)
        self.reduce = inner.reduce
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.shape = shape
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.count_stddev = count_stddev
        self.accountant = ClientAccountant(self.noise_multiplier, delta, shape)
        self.round = 0
        self.reference: State = {}
        self._metrics: dict = {}

    @property
    def poisson_sampling(self) -> bool:
        """Whether a round's clients are drawn by Poisson sampling (a sample of varying size, maybe empty)."""
        return self.shape.sampling == "poisson" and self.shape.rate < 1

    def sigma_b(self, round_idx: int) -> float:
        """The count noise sigma_b (default: the expected clients of the round / 20, as Andrew et al.)."""
        return self.count_stddev if self.count_stddev is not None else self.shape.denominator(round_idx) / 20

    def update_multiplier(self, round_idx: int) -> float:
        """The noise multiplier of the update: z, or z_delta with adaptive clipping."""
        if not self.adaptive:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.sigma_b(round_idx))

    # --------------------------------------------------------------------------------------- the protocol
    def sample(self, num_clients, fraction, seed, round_idx, everyone=False):
        if everyone or fraction >= 1 or self.shape.sampling == "fixed":
            return super().sample(num_clients, fraction, seed, round_idx, everyone)
        return poisson_sample(num_clients, fraction, seed, round_idx)

    def begin_round(self, round_idx, global_state):
        self.round = round_idx
        self.reference = dict(global_state)
        self._metrics = {}
        self.inner.begin_round(round_idx, global_state)

    def _delta(self, upload: State, reference: State) -> State:
        return {k: v.to(torch.float64) - (reference[k].to(torch.float64) if k in reference else 0.0)
                for k, v in upload.items()}

    def partial_sum(self, uploads, weights, template):
        """This process's clipped sum of updates (float64, in client-id order), with the number of unclipped
        updates (key ``":unclipped"``) and of uploads (key ``""``); ``weights`` are ignored (uniform)."""
        sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in template.items()}
        unclipped = 0.0
        for cid in sorted(uploads):
            clipped, norm = clip_update(self._delta(uploads[cid], template), self.clip_norm)
            for key, value in clipped.items():
                sums[key] = sums[key] + value if key in sums else value
            unclipped += float(norm <= self.clip_norm)
        return {**sums, ":unclipped": torch.tensor(unclipped, dtype=torch.float64),
                "": torch.tensor(float(len(uploads)), dtype=torch.float64)}

    def finish(self, sums, template):
        """The new global state from the summed :meth:`partial_sum` of every process: the reference plus the sum
        over the fixed denominator plus the seeded noise; updates the adaptive clipping norm."""
        round_idx = self.round
        m = self.shape.denominator(round_idx)
        unclipped = float(sums[":unclipped"])
        count = int(round(float(sums[""])))
        sums = {k: v for k, v in sums.items() if k not in ("", ":unclipped")}
        keys = sorted(set(sums) | set(template))
        shapes = {k: (sums[k] if k in sums else template[k]) for k in keys}
        std = self.update_multiplier(round_idx) * self.clip_norm / m
        noise = gaussian_noise(shapes, std, noise_seed(self.seed, round_idx))
        merged = {}
        for key in keys:
            base = template[key].to(torch.float64) if key in template else 0.0
            total = sums[key] if key in sums else 0.0
            dtype = template[key].dtype if key in template else torch.float32
            merged[key] = (base + total / m + noise[key]).to(dtype)
        self._metrics = {"dp_clients": count, "dp_clip_norm": self.clip_norm}
        if self.adaptive:
            self._adapt(unclipped, count, m, round_idx)
        return merged

    def _adapt(self, unclipped: float, count: int, m: float, round_idx: int) -> None:
        """Andrew et al.'s geometric update of the clipping norm from the noised unclipped fraction."""
        generator = torch.Generator().manual_seed(noise_seed(self.seed, round_idx, COUNT_STREAM))
        noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * self.sigma_b(round_idx)
        fraction = (unclipped - 0.5 * count + noise) / m + 0.5
        self.clip_norm = self.clip_norm * math.exp(-self.clip_lr * (fraction - self.target_quantile))
        self._metrics["dp_unclipped_fraction"] = fraction

    def aggregate(self, uploads, weights, round_idx):
        self.round = round_idx
        return self.finish(self.partial_sum(uploads, weights, self.reference), self.reference)

    def round_metrics(self):
        eps = self.accountant.epsilon(self.round)
        return {**self.inner.round_metrics(), **self._metrics, "epsilon": eps,
                "dp_noise_multiplier": self.noise_multiplier}

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "clip_norm": self.clip_norm}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state.get("inner", {}))
        if "clip_norm" in state:
            self.clip_norm = float(state["clip_norm"])


# ------------------------------------------------------------------------------------------------- building
def round_shape(num_clients: int, fraction: float, sampling: str, everyone_first: bool) -> RoundShape:
    """The :class:`RoundShape` of a federation (the loop's fixed sample size: ``max(1, round(fraction K))``)."""
    rate = 1.0 if fraction >= 1 else float(fraction)
    size = num_clients if rate >= 1 else max(1, int(round(fraction * num_clients)))
    if sampling == "fixed" and rate < 1:
        rate = size / num_clients
    return RoundShape(num_clients, rate, sampling, size, everyone_first and rate < 1)


def check_private_method(method, aggregator: Aggregator) -> None:
    """Client-level DP needs a method that shares state through a mean of the uploads; one line otherwise."""
    name = method.name
    if not method.communicates or not method.trains:
        raise FedPromptError(f"dp: {name} shares no trained state with a server, so client-level DP has nothing to "
                             "protect; leave the dp settings unset.")
    if aggregator.per_client_download:
        raise FedPromptError(f"dp: {name} sends each client other clients' own uploads (per-client downloads), "
                             "which client-level DP on the global state does not cover; leave the dp settings unset.")
    if not aggregator.averages_uploads:
        raise FedPromptError(f"dp: {name}'s server rule is not a mean of the uploads (it keeps or selects them), so "
                             "DP-FedAvg's clipped noised mean cannot replace it; leave the dp settings unset.")


def build_private_aggregator(dp, method, aggregator: Aggregator, num_clients: int, federation,
                             quiet: bool = False) -> PrivateAggregator:
    """The DP-FedAvg server around ``aggregator`` from the ``dp`` settings (:class:`fedprompt.args.DPArgs`), with
    ``noise_multiplier`` calibrated from ``target_epsilon`` when that is given; checks the settings and warns (one
    line, the run goes on; not when ``quiet``, e.g. on the other processes) when the guarantee is weak."""
    check_private_method(method, aggregator)
    if dp.clip_norm is None:
        raise FedPromptError("dp.clip_norm is not set: client-level DP clips every client's update to this L2 norm "
                             "(e.g. --dp.clip_norm 0.1); set it.")
    shape = round_shape(num_clients, federation.fraction, dp.sampling, federation.all_clients_first_round)
    rounds = federation.rounds
    z = dp.noise_multiplier
    if z is None:
        z = calibrate_noise_multiplier(dp.target_epsilon, dp.delta, rounds, shape)
    private = PrivateAggregator(aggregator, z, dp.clip_norm, dp.delta, shape, dp.adaptive_clipping,
                                dp.target_quantile, dp.clip_lr, dp.count_stddev)
    if dp.adaptive_clipping:
        for r in (1, 2):  # a count noise too small for the budget fails here, before training
            try:
                private.update_multiplier(r)
            except FedPromptError as err:
                if dp.target_epsilon is None:
                    raise
                raise FedPromptError(f"dp.target_epsilon: {dp.target_epsilon:g} needs noise multiplier {z:.3g}, "
                                     f"which adaptive clipping cannot split with the count noise: {err}") from None
    if not quiet:
        _warn_if_weak(private, rounds, num_clients, dp.delta)
    return private


def _warn_if_weak(private: PrivateAggregator, rounds: int, num_clients: int, delta: float) -> None:
    eps = private.accountant.epsilon(rounds)
    if not math.isfinite(eps):
        warn("dp.noise_multiplier is 0: updates are clipped but not noised, so there is no privacy guarantee "
             "(epsilon is infinite: metrics.jsonl and summary.json write it as null).")
    elif eps > WEAK_EPSILON:
        rate = private.shape.rate
        who = "every client in every round" if rate >= 1 else f"a fraction {rate:g} of the clients each round"
        warn(f"dp: epsilon will be {eps:.3g} at delta {delta:g} after {rounds} rounds (noise multiplier "
             f"{private.noise_multiplier:.3g}, {who} of {num_clients}), a weak guarantee; add noise, sample fewer "
             "clients per round, or train fewer rounds.")
    if leaks_outright(delta, num_clients):
        warn(f"dp.delta {delta:g} is not below 1 / {num_clients} clients: the guarantee allows one client's data to "
             "leak outright with that probability; lower dp.delta.")


def leaks_outright(delta: float, units: int) -> bool:
    """The one check of a DP delta, client-level (``dp.delta`` against the number of clients) and record-level
    (DP-FPL's ``method.delta`` against a client's training samples): a delta of at least 1 / ``units`` allows one
    unit's data to leak outright with probability delta (each warns in one line; the run goes on)."""
    return units > 0 and delta >= 1.0 / units


def warn_record_privacy(method, clients, quiet: bool = False) -> None:
    """A method with record-level DP (``method.record_privacy``: DP-FPL's noise multiplier and delta) gets the same
    check of its delta as client-level DP (:func:`leaks_outright`), against the smallest client's training
    samples."""
    record = method.record_privacy
    if record is None or quiet or not clients:
        return
    delta, smallest = record[1], min(len(client.train) for client in clients)
    if leaks_outright(delta, smallest):
        warn(f"method.delta {delta:g} is not below 1 / {smallest} training samples (the smallest client's): the "
             "guarantee allows one training sample to leak outright with that probability; lower method.delta.")

