"""Client sampling and placement. Both are pure functions of (seed, round), so every rank computes the same
selection without talking and a resumed run samples exactly what the uninterrupted run would have."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. run seed, round, client id)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def sample_clients(num_clients: int, fraction: float, seed: int, round_idx: int, everyone: bool = False) -> list[int]:
    """Sorted ids of the clients that train in ``round_idx``: max(1, round(fraction * K)) of them, or all."""
    if everyone or fraction >= 1.0:
        return list(range(num_clients))
    count = max(1, int(round(fraction * num_clients)))
    rng = np.random.default_rng([seed, round_idx, 7])
    return sorted(rng.choice(num_clients, size=count, replace=False).tolist())


def place(client_ids: list[int], rank: int, world_size: int) -> list[int]:
    """The clients this rank handles: round-robin over the sorted ids (balanced to within one client)."""
    return [cid for i, cid in enumerate(sorted(client_ids)) if i % world_size == rank]


def drop_clients(sampled: list[int], rate: float, seed: int, round_idx: int) -> list[int]:
    """Sorted ids of the sampled clients that never report in ``round_idx`` (FLiP's ``--client_drop_rate``): of the
    n sampled, ``floor((1 - rate) * n)`` report, drawn without replacement (the count is taken with a tolerance of
    1e-9: a rate of 0.9 keeps 1 of 10 clients, where FLiP's ``int()`` of the float product 0.999... keeps none)."""
    if rate <= 0 or not sampled:
        return []
    keep = int((1 - rate) * len(sampled) + 1e-9)
    rng = np.random.default_rng([seed, round_idx, 11])
    kept = set(rng.choice(len(sampled), size=keep, replace=False).tolist())
    return sorted(cid for i, cid in enumerate(sorted(sampled)) if i not in kept)
