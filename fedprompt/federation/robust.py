"""Robust aggregation: the server merges the round's uploads with a rule that tolerates malicious clients.

Built by :func:`build_robust_aggregator` from the ``robust`` settings (:class:`fedprompt.threats.RobustArgs`)
around the method's rule (and around client-level DP's, which is then the inner rule), as
:class:`RobustAggregator`:

- **norm bounding** (Sun, Kairouz, Suresh, McMahan 2019): each upload's update (the upload minus the global state
  the round started from, flat L2 over the shared tensors; a key the global state lacks counts from zero) is scaled
  to at most ``robust.norm_bound`` before the rule sees it. It is a server step over single uploads
  (:attr:`fedprompt.federation.server.Server.upload_steps`, :meth:`RobustAggregator.bound`), so it works with every
  rule, client-level DP included;
- **coordinate-wise median** and **trimmed mean** (Yin, Chen, Kannan, Bartlett 2018): Flower's
  ``aggregate_median`` and ``aggregate_trimmed_avg`` (:mod:`flwr.server.strategy.aggregate`) over the uploads as
  float64 numpy arrays, cast back to each tensor's dtype (so exact: the median of float32 values, and their trimmed
  mean, are computed in float64 and rounded once). They replace a mean of the uploads (the method's rule must
  declare ``averages_uploads``) and, as Flower's, ignore the clients' data sizes;
- **Krum and multi-Krum** (Blanchard, El Mhamdi, Guerraoui, Stainer 2017): every upload's score is the sum of its
  squared distances to its ``n - f - 2`` nearest other uploads (at least one); the ``keep`` uploads with the
  smallest scores are handed to the method's own rule (:func:`krum_select`; with a mean rule this is Flower's
  ``aggregate_krum``, which the tests check). As a filter in front of the method's rule it works for every rule that
  sees single uploads (FedMGP's selection and pFedMoAP's expert store only see the kept uploads).

Every rule runs on the server over the uploads in client-id order, so it gives the same global state in both
runtimes and for any lock-step group size K (the uploads themselves are K-invariant up to float rounding). The
wrapper never takes the ``reduce`` path: the uploads are gathered one by one (a reduce rule such as FedTPG's then
merges them with its ``aggregate``, which equals its reduce merge up to float64 rounding).

What cannot combine is refused in one line before anything is written (:func:`check_robust`): median, trimmed
mean and Krum with client-level DP (DP-FedAvg's noise is calibrated to the sensitivity of the clipped mean; another
rule has another sensitivity), median and trimmed mean with a rule that is not a mean of the uploads, any rule for a
method that shares nothing; Flower's SecAgg+ refuses every one of them, since the server sees only the sum.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedprompt.errors import FedPromptError, warn
from fedprompt.federation.aggregators import Aggregator, WrappingAggregator
from fedprompt.federation.privacy import clip_update

State = dict[str, torch.Tensor]

#: rules that replace a mean of the uploads (the method's rule must be one)
MEAN_RULES = ("median", "trimmed_mean")


# -------------------------------------------------------------------------------------------------- rules
def _arrays(upload: State, keys: list[str]) -> list[np.ndarray]:
    return [upload[k].detach().to(torch.float64).cpu().numpy() for k in keys]


def _same_layout(uploads: dict[int, State], rule: str) -> list[str]:
    """The uploads' common keys (sorted); one line when their keys or shapes differ."""
    ids = sorted(uploads)
    keys = sorted(uploads[ids[0]])
    shapes = {k: tuple(uploads[ids[0]][k].shape) for k in keys}
    for cid in ids[1:]:
        if sorted(uploads[cid]) != keys or any(tuple(uploads[cid][k].shape) != shapes[k] for k in keys):
            raise FedPromptError(f"robust.rule {rule}: the uploads of clients {ids[0]} and {cid} differ in their keys "
                                 "or shapes, so they cannot be compared coordinate by coordinate; use another "
                                 "robust.rule for this method.")
    return keys


def coordinate_rule(uploads: dict[int, State], rule: str, trim: float) -> State:
    """The coordinate-wise ``median`` or ``trimmed_mean`` (cutting ``int(trim n)`` uploads at each end) of the
    uploads, by Flower's aggregation functions in float64, each tensor cast back to its dtype."""
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

    ids = sorted(uploads)
    if not ids:
        return {}
    keys = _same_layout(uploads, rule)
    results = [(_arrays(uploads[cid], keys), 1) for cid in ids]
    merged = aggregate_median(results) if rule == "median" else aggregate_trimmed_avg(results, trim)
    first = uploads[ids[0]]
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)).to(first[k].dtype) for k, v in zip(keys, merged)}


def krum_scores(uploads: dict[int, State], malicious: int) -> dict[int, float]:
    """Each upload's Krum score: the sum of its squared L2 distances (flat over its tensors, float64) to its
    ``max(1, n - malicious - 2)`` nearest other uploads (Flower's ``aggregate_krum`` rule)."""
    ids = sorted(uploads)
    keys = _same_layout(uploads, "krum")
    flat = np.stack([np.concatenate([a.ravel() for a in _arrays(uploads[cid], keys)]) for cid in ids])
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    nearest = max(1, len(ids) - malicious - 2)
    scores = {}
    for row, cid in enumerate(ids):
        others = np.sort(np.delete(distances[row], row))
        scores[cid] = float(others[:nearest].sum())
    return scores


def krum_select(uploads: dict[int, State], malicious: int, keep: int) -> list[int]:
    """The ids (sorted) of the ``keep`` uploads with the smallest Krum scores (all of them when there are no more
    than ``keep``; ties by client id)."""
    if len(uploads) <= keep:
        return sorted(uploads)
    scores = krum_scores(uploads, malicious)
    return sorted(sorted(scores, key=lambda cid: (scores[cid], cid))[:keep])


def bound_update(upload: State, reference: State, bound: float) -> tuple[State, bool]:
    """``upload`` with its update (``upload - reference``, flat L2 over its tensors) scaled to at most ``bound``, and
    whether it was scaled; an update within the bound is returned as it is."""
    for key, value in upload.items():
        if key in reference and tuple(reference[key].shape) != tuple(value.shape):
            raise FedPromptError(f"robust.norm_bound: the upload's {key} {tuple(value.shape)} is not shaped like the "
                                 f"global state's {tuple(reference[key].shape)}, so its update is undefined; leave "
                                 "robust.norm_bound unset for this method.")
    delta = {k: v.to(torch.float64) - (reference[k].to(torch.float64) if k in reference else 0.0)
             for k, v in upload.items()}
    clipped, norm = clip_update(delta, bound)
    if norm <= bound:
        return upload, False
    out = {}
    for key, value in upload.items():
        base = reference[key].to(torch.float64) if key in reference else 0.0
        out[key] = (base + clipped[key]).to(value.dtype)
    return out, True


# --------------------------------------------------------------------------------------------- the server
class RobustAggregator(WrappingAggregator):
    """A method's rule (or client-level DP's) behind a robust merge (see the module docstring): ``upload``,
    ``download``, ``apply``, ``sample`` and the state are the inner rule's; ``aggregate`` is the robust rule;
    :meth:`bound` is the norm-bounding server step. Rows get ``robust_kept`` (Krum's kept clients) and
    ``robust_bounded`` (the clients whose update was bounded).

    Args:
        inner: the rule inside.
        rule: ``none``, ``median``, ``trimmed_mean`` or ``krum``.
        trim, malicious, keep, norm_bound: the ``robust`` settings.
    """

    def __init__(self, inner: Aggregator, rule: str, trim: float = 0.25, malicious: int = 1, keep: int = 1,
                 norm_bound: float | None = None):
        super().__init__(inner)
        self.rule = rule
        self.trim, self.malicious, self.keep, self.norm_bound = trim, malicious, keep, norm_bound
        self.reduce = False  # single uploads, always
        self.per_client_download = inner.per_client_download
        self.averages_uploads = inner.averages_uploads and rule == "none"
        self.aggregates_empty_rounds = inner.aggregates_empty_rounds
        self._metrics: dict = {}

    def __getattr__(self, name):  # what the inner rule declares beyond the protocol (poisson_sampling, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def sample(self, num_clients, fraction, seed, round_idx, everyone=False):
        return self.inner.sample(num_clients, fraction, seed, round_idx, everyone)

    def begin_round(self, round_idx, global_state):
        self._metrics = {}
        self.inner.begin_round(round_idx, global_state)

    def bound(self, uploads: dict[int, State], global_state: State, round_idx: int) -> dict[int, State]:
        """The norm-bounding server step (:data:`fedprompt.federation.server.ServerStep`)."""
        out, bounded = {}, []
        for cid in sorted(uploads):
            out[cid], scaled = bound_update(uploads[cid], global_state, self.norm_bound)
            if scaled:
                bounded.append(cid)
        self._metrics["robust_bounded"] = bounded
        return out

    def aggregate(self, uploads, weights, round_idx):
        if self.rule in MEAN_RULES:
            return coordinate_rule(uploads, self.rule, self.trim)
        if self.rule == "krum" and uploads:
            kept = krum_select(uploads, self.malicious, self.keep)
            self._metrics["robust_kept"] = kept
            uploads = {cid: uploads[cid] for cid in kept}
            weights = {cid: weights[cid] for cid in kept}
        return self.inner.aggregate(uploads, weights, round_idx)

    def round_metrics(self):
        return {**self.inner.round_metrics(), **self._metrics}

    def state_dict(self):
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state.get("inner", {}))


# --------------------------------------------------------------------------------------------------- build
def check_robust(robust, method, aggregator: Aggregator, dp_enabled: bool) -> None:
    """One line for what the ``robust`` settings cannot combine with (module docstring)."""
    rule = robust.rule
    if not method.communicates or not method.trains:
        raise FedPromptError(f"robust: {method.name} shares no trained state with a server, so there is nothing to "
                             "aggregate robustly; leave the robust settings unset.")
    if rule != "none" and dp_enabled:
        raise FedPromptError(f"robust.rule {rule} with client-level DP: DP-FedAvg's noise is calibrated to the "
                             "sensitivity of the clipped mean of the updates, which a median, trimmed mean or Krum "
                             "does not have; use robust.norm_bound alone with dp (DP's clipping already bounds each "
                             "update), or leave dp unset.")
    if rule in MEAN_RULES and not aggregator.averages_uploads:
        raise FedPromptError(f"robust.rule {rule}: {method.name}'s server rule is not a mean of the uploads (it keeps, "
                             f"selects or noises them), so a coordinate-wise {rule} cannot replace it; use "
                             "robust.rule krum or robust.norm_bound, which filter or bound the uploads in front of "
                             "the method's own rule.")


def round_size(num_clients: int, federation) -> int:
    """The uploads of an ordinary round (the fixed sample, before drop-outs)."""
    size = num_clients if federation.fraction >= 1 else max(1, int(round(federation.fraction * num_clients)))
    return max(1, int((1 - federation.drop_rate) * size + 1e-9))


def warn_weak_robust(robust, num_clients: int, federation) -> None:
    """One warning line when the rule does nothing or its guarantee cannot hold for the round size."""
    n = round_size(num_clients, federation)
    if robust.rule == "trimmed_mean" and int(robust.trim * n) == 0:
        warn(f"robust.trim {robust.trim:g} cuts int({robust.trim:g} x {n}) = 0 of the {n} uploads of a round at each "
             "end: the trimmed mean is the plain mean; raise robust.trim.")
    if robust.rule == "krum":
        if n <= 2 * robust.malicious + 2:
            warn(f"robust.malicious {robust.malicious}: Krum's guarantee needs more than 2 f + 2 = "
                 f"{2 * robust.malicious + 2} uploads a round, and a round has {n}; the rule runs without it.")
        if robust.keep >= n:
            warn(f"robust.keep {robust.keep} keeps every one of the {n} uploads of a round: Krum filters nothing; "
                 "lower robust.keep.")


def build_robust_aggregator(robust, method, aggregator: Aggregator, num_clients: int, federation, dp_enabled: bool,
                            quiet: bool = False) -> RobustAggregator:
    """The robust server around ``aggregator`` from the ``robust`` settings, checked (one line) and warned about
    (not when ``quiet``)."""
    check_robust(robust, method, aggregator, dp_enabled)
    if not quiet:
        warn_weak_robust(robust, num_clients, federation)
    return RobustAggregator(aggregator, robust.rule, robust.trim, robust.malicious, robust.keep, robust.norm_bound)


def install_norm_bound(server) -> None:
    """Append the norm-bounding step to the server's upload steps when its rule bounds updates."""
    rule = server.aggregator
    if isinstance(rule, RobustAggregator) and rule.norm_bound is not None and math.isfinite(rule.norm_bound):
        server.upload_steps.append(rule.bound)
