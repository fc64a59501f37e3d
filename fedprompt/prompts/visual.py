"""Visual prompt tokens: learnable tokens that join a ViT image tower's token sequence (VPT / MaPLe style)."""

from __future__ import annotations

import torch
from torch import nn


def init_visual_tokens(groups: int, n_tokens: int, width: int, depth: int = 1, std: float = 0.02,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, std^2) visual prompt tokens: ``[groups, n_tokens, width]`` (shallow, ``depth = 1``) or
    ``[groups, depth, n_tokens, width]`` (deep: fresh tokens for each of the first ``depth`` layers)."""
    shape = (groups, n_tokens, width) if depth == 1 else (groups, depth, n_tokens, width)
    return torch.randn(*shape, generator=generator) * std


class VisualPrompts(nn.Module):
    """Learnable visual prompt tokens ``tokens`` for :meth:`fedprompt.backbone.Backbone.encode_image_prompted`.

    Args:
        groups: number of prompt sets (FedMGP's visual groups G_v).
        n_tokens: tokens per set and layer (V).
        width: token width of the ViT image tower (:attr:`Backbone.visual_width`).
        depth: 1 for shallow prompts ``[groups, V, width]``, more for deep prompts ``[groups, depth, V, width]``.
        std: standard deviation of the N(0, std^2) initialisation (0.02 in FedMGP's and MaPLe's code).
        generator: random generator of the initialisation (seed it from the run's seed).
        slots: client slots (a leading client dimension, see :class:`fedprompt.methods.PromptClient`), or ``None``
            for none; every slot starts from the same tokens.
    """

    def __init__(self, groups: int, n_tokens: int, width: int, depth: int = 1, std: float = 0.02,
                 generator: torch.Generator | None = None, slots: int | None = None):
        super().__init__()
        tokens = init_visual_tokens(groups, n_tokens, width, depth, std, generator)
        if slots is not None:
            tokens = tokens.unsqueeze(0).repeat(slots, *[1] * tokens.dim())
        self.slotted = slots is not None
        self.tokens = nn.Parameter(tokens)

    @property
    def groups(self) -> int:
        return self.tokens.shape[1 if self.slotted else 0]

    @property
    def depth(self) -> int:
        return 1 if self.tokens.dim() == 3 + self.slotted else self.tokens.shape[-3]

    def forward(self) -> torch.Tensor:
        return self.tokens
