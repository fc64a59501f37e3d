"""The sampler: who takes part in a round, and each trained client's local plan.

Everything here is a pure function of the run seed, the round and the clients' sizes, so every process (every
Fabric rank, the Flower server and every Flower node) computes the same answers without talking, and a resumed run
the same as an uninterrupted one:

- the clients **sampled** in a round (the server's rule, :meth:`fedprompt.federation.aggregators.Aggregator.sample`:
  a fixed-size sample, or Poisson sampling under client-level DP);
- those of them that **drop out** (``federation.drop_rate``: they never report);
- the clients that **train** (sampled, not dropped), remembered per round (:meth:`Sampler.members`), from which the
  learning-rate schedule's position (:meth:`Sampler.epochs_before`) and the record-level privacy accounting
  (:meth:`Sampler.rounds_trained`) follow;
- each trained client's **local plan** (:meth:`Sampler.plan`: its batches and augmentation seeds).
"""

from __future__ import annotations

from fedprompt.errors import FedPromptError
from fedprompt.federation.feed import LocalPlan, local_epoch_count, local_plan
from fedprompt.federation.sampling import derive_seed, drop_clients


class Sampler:
    """Who takes part in each round of a federation.

    Args:
        aggregator: the server's rule (its ``sample`` draws the round's clients).
        sizes: every client's number of train samples (client id order).
        federation: the federation settings (``fraction``, ``all_clients_first_round``, ``drop_rate``).
        train: the local-training settings (batch size, local epochs or steps).
        optim: the method's optimiser settings (``lr_scope``, ``counts_run_epochs``), or ``None``.
        seed: the run seed.
    """

    def __init__(self, aggregator, sizes: list[int], federation, train, optim, seed: int):
        self.aggregator = aggregator
        self.sizes = list(sizes)
        self.federation = federation
        self.train = train
        self.optim = optim
        self.seed = seed
        self._members: dict[int, frozenset] = {}
        self._epochs: dict[int, int] = {}

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    def sampled(self, round_idx: int) -> list[int]:
        """The sorted ids of the clients sampled in ``round_idx``."""
        federation = self.federation
        return self.aggregator.sample(self.num_clients, federation.fraction, self.seed, round_idx,
                                      everyone=round_idx == 1 and federation.all_clients_first_round)

    def dropped(self, sampled: list[int], round_idx: int) -> list[int]:
        """The sampled clients that never report in ``round_idx`` (``federation.drop_rate``): they do not train and
        send nothing."""
        return drop_clients(sampled, self.federation.drop_rate, self.seed, round_idx)

    def trained(self, round_idx: int, sampled: list[int] | None = None) -> list[int]:
        """The clients that train in ``round_idx``: the sampled ones (``sampled``, if the caller has them) that do
        not drop out."""
        sampled = self.sampled(round_idx) if sampled is None else sampled
        dropped = set(self.dropped(sampled, round_idx))
        return [cid for cid in sampled if cid not in dropped]

    def members(self, round_idx: int) -> frozenset:
        """The clients that train in ``round_idx`` (remembered: earlier rounds are asked again and again)."""
        if round_idx not in self._members:
            self._members[round_idx] = frozenset(self.trained(round_idx))
        return self._members[round_idx]

    def rounds_trained(self, last_round: int) -> dict[int, int]:
        """How many of the rounds 1 to ``last_round`` each client trained in."""
        counts = {cid: 0 for cid in range(self.num_clients)}
        for r in range(1, last_round + 1):
            for cid in self.members(r):
                counts[cid] += 1
        return counts

    def local_epochs(self, cid: int) -> int:
        """The passes (started) over client ``cid``'s train data in one local round."""
        train = self.train
        return local_epoch_count(self.sizes[cid], train.batch_size, train.local_epochs, train.local_steps)

    def epochs_before(self, cid: int, round_idx: int) -> int:
        """The schedule position of client ``cid``'s local round in ``round_idx`` (a function of the run seed and the
        client sizes only, so it holds on any number of processes and after a resume).

        ``lr_scope: official``: the local epochs trained before it if the trained clients (sampled, not dropped)
        were trained one after another (rounds in order, a round's clients by increasing id), as the official code's
        single trainer does (the position of its one learning-rate scheduler). ``lr_scope: client``: the local epochs
        client ``cid`` itself trained in earlier rounds (its own scheduler, as FedTPG's released code)."""
        if self.optim is not None and self.optim.lr_scope == "client":
            return self.local_epochs(cid) * sum(cid in self.members(r) for r in range(1, round_idx))
        total = 0
        for r in range(1, round_idx):
            if r not in self._epochs:
                self._epochs[r] = sum(self.local_epochs(c) for c in self.trained(r))
            total += self._epochs[r]
        return total + sum(self.local_epochs(c) for c in self.trained(round_idx) if c < cid)

    def plan(self, cid: int, round_idx: int) -> LocalPlan:
        """Client ``cid``'s local batches in ``round_idx`` (a function of the run seed, the round and the client)."""
        train = self.train
        plan = local_plan(cid, self.sizes[cid], train.batch_size, train.local_epochs, train.local_steps,
                          derive_seed(self.seed, round_idx, cid))
        if self.optim is not None and self.optim.counts_run_epochs:
            plan.epochs_before = self.epochs_before(cid, round_idx)
        return plan

    def check_reporting(self) -> None:
        """One line, before anything runs, when ``federation.drop_rate`` leaves no client to report in any round:
        a round of ``n`` sampled clients keeps ``floor((1 - drop_rate) n)`` of them, and no round samples more
        than every client (round 1 with ``all_clients_first_round``, or Poisson sampling) or, else, the fixed
        sample size."""
        federation, total = self.federation, self.num_clients
        rate = federation.drop_rate
        if rate <= 0:
            return
        largest = total
        if federation.fraction < 1 and not federation.all_clients_first_round and \
                not getattr(self.aggregator, "poisson_sampling", False):
            largest = max(1, int(round(federation.fraction * total)))
        if int((1 - rate) * largest + 1e-9) == 0:
            raise FedPromptError(f"federation.drop_rate: {rate:g} keeps floor((1 - {rate:g}) x {largest}) = 0 of the "
                                 f"at most {largest} clients a round samples, so no client would ever report; use "
                                 f"--federation.drop_rate {1 - 1 / largest:.4g} or less, or sample more clients.")
