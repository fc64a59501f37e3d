"""FedMVP's PromptFormer: instance-level visual prompts from an image's patch embeddings and class attributes
(learnable tensors only).

FedMVP (Singha et al., ICCV 2025) conditions its visual prompts on both modalities: the patch embeddings of the
image (the ViT tower's input tokens before ``ln_pre``) attend to the frozen text features of LLM-generated class
attributes, and the result, pooled to a few tokens, joins the image tower's token sequence. Structure (from the
paper and the released model code; written independently):

- context ``a = W_c e + b_c``: the L2-normalised attribute features ``e`` ``[K, E]`` mapped to the tower's width;
- one cross-attention, pre-LayerNorm on the queries and on the keys: ``h = MHA(LN_q(x), LN_c(a), a)`` with ``x`` the
  patch embeddings ``[B, N, width]``; the values are the context itself, not normalised, and the attention output
  replaces the queries (no residual), as in the released ``PreNorm`` / ``CrossAttention``;
- a GEGLU feed-forward block with a residual: ``h = h + W2 (u * GELU(g))``, ``[u, g] = W1 LN(h)``;
- adaptive average pooling of the N positions to ``tokens`` visual prompt tokens ``[B, tokens, width]``.

Parameters for ViT-B/16 (width 768, E 512, 4 heads, ff_mult 4): 9,845,760 = context map 393,984 (512 x 768 +
768) + two attention LayerNorms 3,072 + attention in-projection 1,771,776 (3 x 768 x 768 + 2,304) +
out-projection 590,592 + feed-forward LayerNorm 1,536 + W1 4,724,736 (768 x 6,144 + 6,144) + W2 2,360,064
(3,072 x 768 + 768).

FedMVP's optional LoRA acts on the attention's inputs: :meth:`PromptFormer.forward` takes ``adapt(role, x)``, called on
the queries (``role`` "query", before their LayerNorm), the keys' and the values' context ("key", before its
LayerNorm; "value") -- the factors themselves live with the client (:class:`fedprompt.backbone.adapters.StackedLoRA`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.errors import FedPromptError
from fedprompt.prompts.generator import GEGLU


class PromptFormer(nn.Module):
    """FedMVP's PromptFormer: patch embeddings ``[B, N, width]`` and attribute features ``[K, embed_dim]`` ->
    visual prompt tokens ``[B, tokens, width]``.

    Args:
        width: token width of the ViT image tower (768 for ViT-B/16).
        embed_dim: width of the attribute features (the joint image-text width, 512 for ViT-B/16).
        heads: attention heads (FedMVP: 4); must divide ``width``.
        ff_mult: hidden width of the GEGLU feed-forward block as a multiple of ``width`` (FedMVP: 4).
        tokens: visual prompt tokens per image (FedMVP: 4).
    """

    def __init__(self, width: int = 768, embed_dim: int = 512, heads: int = 4, ff_mult: int = 4, tokens: int = 4):
        super().__init__()
        if min(width, embed_dim, heads, ff_mult, tokens) < 1:
            raise FedPromptError(f"PromptFormer: width, embed_dim, heads, ff_mult and tokens must be >= 1, got "
                                 f"{width}, {embed_dim}, {heads}, {ff_mult}, {tokens}")
        if width % heads:
            raise FedPromptError(f"PromptFormer: heads={heads} must divide the image tower's width {width}")
        self.tokens = tokens
        self.context = nn.Linear(embed_dim, width)
        self.norm_queries = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * ff_mult * width), GEGLU(),
                                nn.Linear(ff_mult * width, width))

    def forward(self, patches: torch.Tensor, attributes: torch.Tensor, adapt=None) -> torch.Tensor:
        """Visual prompt tokens ``[B, tokens, width]`` of patch embeddings ``[B, N, width]`` (N >= tokens) given
        attribute features ``[K, embed_dim]`` (shared by the batch); ``adapt(role, x)``, if given, changes the
        attention's inputs first (role "query", "key" or "value")."""
        context = self.context(attributes.to(self.context.weight.dtype))
        batch = patches.shape[0]
        queries, keys, values = patches.to(context.dtype), context, context
        if adapt is not None:
            queries, keys, values = adapt("query", queries), adapt("key", keys), adapt("value", values)
        keys = self.norm_context(keys).expand(batch, -1, -1)
        values = values.expand(batch, -1, -1)
        x, _ = self.attn(self.norm_queries(queries), keys, values, need_weights=False)
        x = x + self.ff(x)
        return F.adaptive_avg_pool1d(x.transpose(1, 2), self.tokens).transpose(1, 2)
