"""CoOp context vectors: ``n_ctx`` learnable token embeddings placed after the start token."""

from __future__ import annotations

import torch
from torch import nn

from fedprompt.errors import FedPromptError


def init_context(shape: tuple[int, ...], n_ctx: int, dim: int, words: torch.Tensor | None = None,
                 std: float = 0.02, generator: torch.Generator | None = None) -> torch.Tensor:
    """A context tensor ``[*shape, n_ctx, dim]``: N(0, std^2), or copies of word embeddings ``words`` [n_ctx, dim]."""
    if words is not None:
        if words.shape != (n_ctx, dim):
            raise FedPromptError(f"ctx_init: the init phrase has {words.shape[0]} tokens but n_ctx is {n_ctx}; "
                                 "set n_ctx to the number of tokens of the phrase (or null to infer it).")
        return words.to(torch.float32).expand(*shape, n_ctx, dim).clone()
    return torch.randn(*shape, n_ctx, dim, generator=generator) * std


class ContextVectors(nn.Module):
    """Learnable context ``ctx`` of shape ``[slots, *shape, n_ctx, dim]`` (unified) or
    ``[slots, *shape, C, n_ctx, dim]`` (CSC), one per client slot (see :class:`fedprompt.methods.PromptClient`).

    Args:
        n_ctx: number of context tokens.
        dim: token embedding width of the text tower.
        shape: leading prompt dimensions after the slot (e.g. ``(2,)`` for a pair of prompts).
        n_cls: class-specific context for this many classes (CoOp's CSC) when given.
        words: word embeddings [n_ctx, dim] to initialise from (``"a photo of a"``), else N(0, 0.02^2).
        generator: random generator for the N(0, 0.02^2) initialisation.
        slots: number of client slots; every slot starts from the same initial value (drawn once).
        initial: the initial value ``[*shape, n_ctx, dim]`` itself (e.g. FedMGP's noisy copies of words), instead
            of ``words`` or N(0, 0.02^2).
    """

    def __init__(self, n_ctx: int, dim: int, shape: tuple[int, ...] = (), n_cls: int | None = None,
                 words: torch.Tensor | None = None, generator: torch.Generator | None = None, slots: int = 1,
                 initial: torch.Tensor | None = None):
        super().__init__()
        lead = tuple(shape) + ((n_cls,) if n_cls else ())
        self.class_specific = bool(n_cls)
        if initial is not None and tuple(initial.shape) != (*lead, n_ctx, dim):
            raise FedPromptError(f"context: initial value of shape {tuple(initial.shape)}, expected "
                                 f"{(*lead, n_ctx, dim)}")
        init = initial.float() if initial is not None else init_context(lead, n_ctx, dim, words, generator=generator)
        self.ctx = nn.Parameter(init.unsqueeze(0).repeat(slots, *[1] * init.dim()))

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def forward(self) -> torch.Tensor:
        return self.ctx
