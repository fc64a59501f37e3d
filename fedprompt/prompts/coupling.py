"""MaPLe's coupling functions: one linear map per prompt layer from the text prompts to the visual prompts, stacked
per client slot (learnable tensors only).

MaPLe (Khattak et al., CVPR 2023) learns text prompts only; the visual prompt of layer j is ``V_j = W_j P_j + b_j``
with ``P_j`` [n_ctx, D] the text prompt of layer j (j = 0: the shallow context, j >= 1: the deep prompts) and
``W_j`` [width, D] (512 -> 768 for ViT-B/16). The J maps of every client are stored as two stacked tensors, ``weight``
[slots, J, width, D] and ``bias`` [slots, J, width], and applied to all active clients and layers at once by one
batched matrix product (:func:`couple`).

Initialisation as in the released code (``trainers/maple.py:103-117``): each map has ``torch.nn.Linear``'s default
initialisation; the layer-0 map is its own ``Linear``, and the J - 1 deep maps are copies of one other ``Linear``, so
they start identical (their inputs differ, so they do not stay identical).
"""

from __future__ import annotations

import torch
from torch import nn


def couple(prompts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The visual prompts ``W_j P_j + b_j``: text prompts [A, J, n, D], weights [A, J, width, D] and biases
    [A, J, width] -> [A, J, n, width] (each client's own maps only)."""
    return torch.einsum("ajnd,ajvd->ajnv", prompts, weight.to(prompts.dtype)) + bias.to(prompts.dtype).unsqueeze(2)


class Coupling(nn.Module):
    """J text-to-vision linear maps per client slot: ``weight`` [slots, J, out_dim, in_dim], ``bias`` [slots, J,
    out_dim] (every slot starts from the same values).

    Args:
        layers: J (the prompt depth: one map for the shallow prompt and one per deep layer).
        in_dim: the text prompt width D (512 for ViT-B/16).
        out_dim: the visual prompt width (768 for ViT-B/16).
        slots: client slots.
    """

    def __init__(self, layers: int, in_dim: int, out_dim: int, slots: int = 1):
        super().__init__()
        first = nn.Linear(in_dim, out_dim)
        deep = nn.Linear(in_dim, out_dim)
        weight = torch.stack([first.weight.detach()] + [deep.weight.detach()] * (layers - 1))
        bias = torch.stack([first.bias.detach()] + [deep.bias.detach()] * (layers - 1))
        self.weight = nn.Parameter(weight.unsqueeze(0).repeat(slots, 1, 1, 1))
        self.bias = nn.Parameter(bias.unsqueeze(0).repeat(slots, 1, 1))

    @property
    def layers(self) -> int:
        return self.weight.shape[1]
