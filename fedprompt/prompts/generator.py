"""FedTPG's text-driven prompt generator: class-name embeddings in, context vectors out (learnable tensors only).

FedTPG (Qiu et al., ICLR 2024) learns a network shared by all clients instead of prompt vectors: ``n_ctx`` learnable
queries attend to the frozen CLIP text embeddings of a client's plain class names, and the result, after a
feed-forward block, is the context of ``"X X X X {class}."``. Because the context is a function of the class names,
the generator applies to classes and datasets it never saw.

Structure (from the paper and the public description of its released model; written independently):

- queries ``[n_ctx, dim]``, N(0, 0.02^2);
- one cross-attention block, pre-LayerNorm on both sides: ``x = MHA(LN_q(queries), LN_kv(E), LN_kv(E))`` with
  ``heads`` heads, keys/values of width ``embed_dim`` (``E`` = the class-name embeddings);
- a GEGLU feed-forward block with a residual: ``x = x + W2 (a * GELU(g))`` with ``[a, g] = W1 LN(x)``,
  ``W1: dim -> 2 * ff_mult * dim``, ``W2: ff_mult * dim -> dim``;
- no self-attention layers (FedTPG's depth 0).

In the released model the attention output *replaces* the queries (no residual around the attention block);
``attn_residual=True`` adds the usual pre-norm residual ``x = queries + MHA(...)`` instead.

Parameters for ``dim = embed_dim = 512`` (CLIP ViT-B/16), ``n_ctx = 4``, 4 heads, ``ff_mult = 4``: 4,206,080 =
queries 2,048 + two attention LayerNorms 2,048 + attention in-projection 787,968 (3 x 512 x 512 weights + 1,536
biases) + out-projection 262,656 (512 x 512 + 512) + feed-forward LayerNorm 1,024 + W1 2,101,248 (512 x 4096 + 4096)
+ W2 1,049,088 (2048 x 512 + 512).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.errors import FedPromptError


class GEGLU(nn.Module):
    """Gated GELU: the last dimension is split in halves ``[a, g]`` and ``a * GELU(g)`` is returned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class PromptGenerator(nn.Module):
    """FedTPG's prompt generator: ``[C, embed_dim]`` class-name embeddings -> ``[n_ctx, dim]`` context vectors.

    Holds learnable tensors only; the class-name embeddings are computed by the caller with the frozen text tower
    (FedTPG: the L2-normalised CLIP text features of each plain class name, so ``embed_dim`` is the joint embedding
    width, 512 for ViT-B/16, and ``dim`` the text tower's token width ``ctx_dim``, also 512 there).

    A leading batch of class-name sets runs in one call: ``[K, C, embed_dim] -> [K, n_ctx, dim]``. Sets with
    different numbers of classes are padded to the longest and passed with ``padding_mask`` ``[K, C]`` (``True`` marks
    a padded position, which then has no influence on that set's output).

    Args:
        dim: width of the generated context vectors (the text tower's token embedding width).
        n_ctx: number of context vectors (FedTPG: 4).
        embed_dim: width of the class-name embeddings (default ``dim``).
        heads: attention heads (FedTPG: 4); must divide ``dim``.
        ff_mult: hidden width of the GEGLU feed-forward block as a multiple of ``dim`` (FedTPG: 4).
        attn_residual: add the queries back after the attention (standard pre-norm block); ``False`` (the released
            FedTPG model) lets the attention output replace them.
        seed: when given, the parameters are initialised from ``torch.manual_seed(seed)`` in a forked random state
            (the global random state is left as it was), so every process builds the same generator.
    """

    def __init__(self, dim: int = 512, n_ctx: int = 4, embed_dim: int | None = None, heads: int = 4,
                 ff_mult: int = 4, attn_residual: bool = False, seed: int | None = None):
        super().__init__()
        embed_dim = dim if embed_dim is None else embed_dim
        if min(dim, n_ctx, embed_dim, heads, ff_mult) < 1:
            raise FedPromptError(f"prompt generator: dim, n_ctx, embed_dim, heads and ff_mult must be >= 1, got "
                                 f"{dim}, {n_ctx}, {embed_dim}, {heads}, {ff_mult}")
        if dim % heads:
            raise FedPromptError(f"prompt generator: heads={heads} must divide dim={dim}")
        self.dim, self.n_ctx, self.embed_dim = dim, n_ctx, embed_dim
        self.attn_residual = attn_residual
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.queries = nn.Parameter(torch.randn(n_ctx, dim) * 0.02)
            self.norm_queries = nn.LayerNorm(dim)
            self.norm_context = nn.LayerNorm(embed_dim)
            self.attn = nn.MultiheadAttention(dim, heads, kdim=embed_dim, vdim=embed_dim, batch_first=True)
            self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * ff_mult * dim), GEGLU(),
                                    nn.Linear(ff_mult * dim, dim))

    def forward(self, class_embeddings: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Context vectors for one set of class names ``[C, E] -> [n_ctx, dim]`` or a batch ``[K, C, E] ->
        [K, n_ctx, dim]``; ``padding_mask`` ``[K, C]`` (or ``[C]``) marks padded class positions with ``True``."""
        single = class_embeddings.dim() == 2
        if class_embeddings.dim() not in (2, 3) or class_embeddings.shape[-1] != self.embed_dim:
            raise FedPromptError(f"prompt generator: class embeddings must be [C, {self.embed_dim}] or "
                                 f"[K, C, {self.embed_dim}], got {list(class_embeddings.shape)}")
        context = class_embeddings.unsqueeze(0) if single else class_embeddings
        if padding_mask is not None:
            padding_mask = padding_mask.to(torch.bool).reshape(context.shape[:2])
            if bool(padding_mask.all(dim=1).any()):
                raise FedPromptError("prompt generator: a class-name set is fully masked; every set needs a class")
        queries = self.queries.expand(context.shape[0], -1, -1)
        kv = self.norm_context(context)
        x, _ = self.attn(self.norm_queries(queries), kv, kv, key_padding_mask=padding_mask, need_weights=False)
        if self.attn_residual:
            x = x + queries
        x = x + self.ff(x)
        return x[0] if single else x
