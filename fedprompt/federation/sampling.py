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
