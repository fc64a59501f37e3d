"""A low-rank context term ``U @ V`` (FedPGP's personalised prompt): ``U`` [n_ctx, r], ``V`` [r, dim] per client."""

from __future__ import annotations

import torch
from torch import nn


class LowRankContext(nn.Module):
    """Learnable low-rank context ``U @ V`` of shape ``[slots, n_ctx, dim]``, one per client slot.

    ``U`` is ``[slots, n_ctx, rank]`` and ``V`` ``[slots, rank, dim]``, both N(0, std^2) (FedPGP: std 0.02), drawn
    once (``U`` first) and copied to every slot.

    Args:
        n_ctx: number of context tokens.
        dim: token embedding width of the text tower.
        rank: the inner dimension r (FedPGP's ``bottleneck``).
        std: standard deviation of the initialisation.
        slots: number of client slots.
    """

    def __init__(self, n_ctx: int, dim: int, rank: int, std: float = 0.02, slots: int = 1):
        super().__init__()
        u = torch.randn(n_ctx, rank) * std
        v = torch.randn(rank, dim) * std
        self.U = nn.Parameter(u.unsqueeze(0).repeat(slots, 1, 1))
        self.V = nn.Parameter(v.unsqueeze(0).repeat(slots, 1, 1))

    @property
    def rank(self) -> int:
        return self.U.shape[-1]

    def forward(self) -> torch.Tensor:
        """``U @ V`` ``[slots, n_ctx, dim]`` of every slot (see :func:`low_rank_product`)."""
        return low_rank_product(self.U, self.V)


def low_rank_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``U @ V`` ``[A, n_ctx, dim]`` of factors ``[A, n_ctx, r]`` and ``[A, r, dim]`` (e.g. the active clients'), in
    fp32 whatever the surrounding autocast (the product is tiny); a batched matmul, so each client's product
    involves only its own factors."""
    with torch.autocast(device_type=u.device.type, enabled=False):
        return torch.bmm(u.float(), v.float())
