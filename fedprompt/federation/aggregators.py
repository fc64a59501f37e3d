"""Server-side merge rules for prompt state dicts.

An :class:`Aggregator` sees the round as the server would:

1. each participating client ``upload``\\ s part of its state (the shared keys by default);
2. ``aggregate`` merges every upload into the new global state (it gets all uploads at once, so non-linear rules
   such as FedMGP's similarity-guided group selection fit the same interface);
3. each client receives ``download(global_state, client_id)`` and merges it with ``apply``.

Around them the loop calls ``sample`` (which clients take part: a fixed-size sample by default), ``begin_round`` (the
global state the round starts from) and, after aggregation, ``round_metrics`` (what the server reports for the round,
e.g. the privacy budget spent).

The round loop gathers the uploads of every rank (in client-id order) before calling ``aggregate``, so a run gives
bit-identical global states for any number of processes.
"""

from __future__ import annotations

import torch

from fedprompt.federation.sampling import sample_clients


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Exact size in bytes of the tensors of a state dict (what crosses the network)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def select_keys(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` whose key starts with one of ``prefixes``."""
    return {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}


class Aggregator:
    """Base merge rule: clients upload and receive the keys starting with ``shared_prefixes``.

    Declared capabilities (the round loop reads them):
        ``reduce``: the global state is a weighted sum of whole client states, merged by an all-reduce of
        per-process sums (:meth:`WeightedMean.partial_sum`, :meth:`WeightedMean.finish`) instead of gathering every
        upload on every process;
        ``seed``: the run's seed, set by the loop before the first round (aggregators with random choices, such as
        FedMGP's group selection, derive their random streams from it);
        ``per_client_download``: ``download`` depends on the client (pFedMoAP sends each client the global prompt
        plus other clients' prompts chosen for it); the loop calls ``download`` per client anyway and counts
        ``bytes_down`` per sampled client, so this declares that payloads differ (and that the server holds other
        clients' uploads for them: client-level DP refuses such a method);
        ``averages_uploads``: ``aggregate`` is a (weighted) mean of the uploads, keyed and shaped like the global
        state, and nothing else is kept of them (client-level DP may replace the mean by its noised, clipped one);
        ``aggregates_empty_rounds``: ``aggregate`` runs also in a round without any upload (DP-FedAvg releases its
        noise every round, also when Poisson sampling picked no client);
        ``in_turn``: the round's clients train one at a time and each later client receives, before its local
        round, what the earlier ones of the same round uploaded (:meth:`share`; pFedMoAP under ``compat:
        official``, the release's order); the round then runs with K = 1 on one process.
    """

    reduce: bool = False
    seed: int = 0
    per_client_download: bool = False
    averages_uploads: bool = False
    aggregates_empty_rounds: bool = False
    in_turn: bool = False

    def __init__(self, shared_prefixes: tuple[str, ...] = ()):
        self.shared_prefixes = tuple(shared_prefixes)

    def upload(self, client_id: int, state: dict[str, torch.Tensor], round_idx: int) -> dict[str, torch.Tensor]:
        """What a client sends to the server after local training."""
        return select_keys(state, self.shared_prefixes)

    def aggregate(self, uploads: dict[int, dict[str, torch.Tensor]], weights: dict[int, float],
                  round_idx: int) -> dict[str, torch.Tensor]:
        """Merge the uploads of the participating clients into the new global state."""
        raise NotImplementedError

    def download(self, global_state: dict[str, torch.Tensor], client_id: int) -> dict[str, torch.Tensor]:
        """What a client receives from the server."""
        return global_state

    def share(self, client_id: int, upload: dict[str, torch.Tensor]) -> None:
        """``in_turn`` rules: keep client ``client_id``'s upload for the downloads of the round's later clients
        (the round's aggregation still sees every upload). Nothing by default."""

    def apply(self, client_state: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
              client_id: int) -> dict[str, torch.Tensor]:
        """A client's new state after merging what it received (overwrite the received keys by default)."""
        return {**client_state, **{k: v.clone() for k, v in received.items()}}

    def sample(self, num_clients: int, fraction: float, seed: int, round_idx: int, everyone: bool = False) -> list[int]:
        """The sorted ids of the clients that train in ``round_idx`` (a pure function of its arguments, so every rank
        and a resumed run agree): ``max(1, round(fraction * num_clients))`` of them drawn without replacement, or
        all (``everyone``); see :func:`fedprompt.federation.sampling.sample_clients`."""
        return sample_clients(num_clients, fraction, seed, round_idx, everyone=everyone)

    def begin_round(self, round_idx: int, global_state: dict[str, torch.Tensor]) -> None:
        """Called by the loop at the start of every round with the global state the round starts from (before any
        client trains)."""

    def round_metrics(self) -> dict:
        """Extra entries of the round's metrics row after aggregation (none by default)."""
        return {}

    def state_dict(self) -> dict:
        """Aggregator state to checkpoint (stateless by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class WrappingAggregator(Aggregator):
    """A server rule in front of another (``inner``, the method's): the client side (``upload``, ``download``,
    ``apply``) and the run seed are the inner rule's; a subclass replaces the server's merge (client-level DP's
    :class:`~fedprompt.federation.privacy.PrivateAggregator`, the robust rules'
    :class:`~fedprompt.federation.robust.RobustAggregator`)."""

    def __init__(self, inner: Aggregator):
        super().__init__(inner.shared_prefixes)
        self.inner = inner

    @property
    def seed(self) -> int:
        return self.inner.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.inner.seed = value

    def upload(self, client_id, state, round_idx):
        return self.inner.upload(client_id, state, round_idx)

    def download(self, global_state, client_id):
        return self.inner.download(global_state, client_id)

    def apply(self, client_state, received, client_id):
        return self.inner.apply(client_state, received, client_id)


class WeightedMean(Aggregator):
    """FedAvg: the mean of the uploaded tensors weighted by the clients' train-sample counts.

    Args:
        shared_prefixes: key prefixes of the shared state.
        weighted: ``False`` gives the unweighted mean (the official PromptFL code).
        reduce: let the round loop merge by an all-reduce of per-process float64 sums (:meth:`partial_sum`,
            :meth:`finish`) instead of gathering every upload on every process; for large states that are shared
            whole (FedTPG's generator). Received tensors are then shared, not copied, between clients.
    """

    averages_uploads = True

    def __init__(self, shared_prefixes: tuple[str, ...] = (), weighted: bool = True, reduce: bool = False):
        super().__init__(shared_prefixes)
        self.weighted = weighted
        self.reduce = reduce

    def partial_sum(self, uploads: dict[int, dict[str, torch.Tensor]], weights: dict[int, float],
                    template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's share of the mean: float64 sums of ``w_k * upload_k`` (in client-id order) and of ``w_k``
        (key ``""``); ``template`` (the global state) gives the keys and shapes when this process has no upload."""
        sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in template.items()}
        total = torch.zeros((), dtype=torch.float64)
        for cid in sorted(uploads):
            w = float(weights[cid]) if self.weighted else 1.0
            for key in sums:
                sums[key] += w * uploads[cid][key].to(torch.float64)
            total += w
        return {**sums, "": total}

    def finish(self, sums: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global state from the summed :meth:`partial_sum` of every process."""
        total = sums[""]
        return {k: (sums[k] / total).to(v.dtype) for k, v in template.items()}

    def apply(self, client_state, received, client_id):
        if not self.reduce:
            return super().apply(client_state, received, client_id)
        return {**client_state, **received}  # the global tensors are never changed in place: share them

    def aggregate(self, uploads, weights, round_idx):
        ids = sorted(uploads)
        if not ids:
            return {}
        w = torch.tensor([float(weights[i]) if self.weighted else 1.0 for i in ids], dtype=torch.float64)
        w = w / w.sum()
        merged = {}
        for key, first in uploads[ids[0]].items():
            stacked = torch.stack([uploads[i][key].to(torch.float64) for i in ids])
            merged[key] = (w.view(-1, *[1] * first.dim()) * stacked).sum(0).to(first.dtype)
        return merged


class NoCommunication(Aggregator):
    """Nothing is sent or received (local training, zero-shot)."""

    def upload(self, client_id, state, round_idx):
        return {}

    def aggregate(self, uploads, weights, round_idx):
        return {}

    def download(self, global_state, client_id):
        return {}
