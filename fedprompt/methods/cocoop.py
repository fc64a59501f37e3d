"""CoCoOp (Zhou et al., CVPR 2022), federated as FedCoCoOp: a CoOp context plus a small meta-network that turns each
image's feature into a bias added to every context token, so every image gets its own prompts.

Each client holds the context ``prompt.ctx`` ([n_ctx, D]) and the meta-net ``meta_net.linear1`` (d -> d/16) -> ReLU
-> ``meta_net.linear2`` (d/16 -> D), with d the joint image-text dimension (the image tower's ``output_dim``: 512 ->
32 -> 512 for ViT-B/16, 1024 -> 64 -> 512 for RN50; the official ``vis_dim``) and D the text token width. For image
b with L2-normalised feature x_b:

    pi_b = W2 relu(W1 x_b + b1) + b2,     prompt_{b,c} = [SOS, v_1 + pi_b, ..., v_M + pi_b, name(c), ".", EOS]
    logit_{b,c} = logit_scale * cos(x_b, g(prompt_{b,c}))

and the loss is the cross-entropy of these per-image logits, nothing else (``CoOp:trainers/cocoop.py:144-194``).
Evaluation runs the same conditional forward on every test image.

**Federation.** Both the context and the meta-net are sent and averaged (sample-weighted FedAvg), as in FLiP
(``flcore/models/clip/CoCoOp.py``: everything in ``prompt_learner``) and in FedMGP's release (``FedCoCoOpLearner``:
every trainable parameter); nothing stays local, so every client holds the same model (``global_acc``).

**One text call per step.** The text encoder runs on B x C sentences per client-step (each image's own prompts
against every class); the official code loops over the B images, one encoder call each. Here the per-image contexts
of all images of all active clients (each built from its own client's context and meta-net) go through the text
encoder together, ``n x C`` sentences in one call (n = the step's images over all clients), cut after the longest
sentence (exact for the causal text tower).

**Bounded memory.** When ``n x C`` exceeds ``max_sentences``, the images are split into chunks of
``max_sentences // C`` (at least one image) and each chunk is encoded separately; in training each chunk runs under
activation checkpointing (``torch.utils.checkpoint``, non-reentrant: its activations are recomputed in the backward
pass instead of kept), so that at any time at most one chunk's text-encoder activations are alive. The text
encoder's working memory is then bounded by about ``max_sentences x L x width x layers`` activations (L the
truncated sentence length: about 20 for CoOp sentences with 4 context tokens, ViT-B/16's text tower has width 512
and 12 layers), independent of the batch size, the number of classes and the number of clients in the step; what
grows with ``n x C`` is only each chunk's input and output kept for the backward pass, ``n x C x (L x D + E)``
values. Chunked and unchunked runs compute the same features (up to float rounding).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedprompt.errors import FedPromptError
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors, SlotStacked


def meta_net_template(vis_dim: int, ctx_dim: int) -> nn.Sequential:
    """CoCoOp's meta-net: Linear(vis_dim, vis_dim // 16) - ReLU - Linear(vis_dim // 16, ctx_dim), PyTorch's default
    Linear initialisation (``CoOp:trainers/cocoop.py:95-99``)."""
    hidden = max(1, vis_dim // 16)
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(vis_dim, hidden)), ("relu", nn.ReLU()),
                                      ("linear2", nn.Linear(hidden, ctx_dim))]))


def per_sample_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``out[i] = weight[i] @ x[i] + bias[i]`` for x ``[n, d_in]``, weight ``[n, d_out, d_in]``, bias ``[n, d_out]``:
    each sample through its own client's layer (one batched matmul)."""
    return torch.baddbmm(bias.unsqueeze(-1), weight.to(x.dtype), x.unsqueeze(-1)).squeeze(-1)


class CoCoOpClient(PromptClient):
    """CoCoOp clients: ``prompt.ctx`` [n_ctx, D] and the meta-net ``meta_net.linear{1,2}.{weight,bias}`` per slot, from
    the :class:`CoCoOp` settings."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx or (words.shape[0] if words is not None else 4)
        # drawn in the official order: the context, then the meta-net's Linear layers
        self.prompt = ContextVectors(self.n_ctx, backbone.ctx_dim, words=words, slots=slots)
        self.meta_net = SlotStacked(meta_net_template(backbone.embed_dim, backbone.ctx_dim), slots)

    def text_features(self) -> torch.Tensor:
        """The active clients' contexts ``[A, n_ctx, D]``: CoCoOp's text features depend on the image, so the text
        encoder runs in :meth:`logits` (timed there)."""
        return self.active(self.prompt.ctx)

    def image_bias(self, image: torch.Tensor) -> torch.Tensor:
        """pi = W2 relu(W1 x + b1) + b2 ``[n, D]`` of each image, through its own client's meta-net."""
        net = self.meta_net
        hidden = per_sample_linear(image, self.per_sample(self.active(net.linear1.weight)),
                                   self.per_sample(self.active(net.linear1.bias)))
        return per_sample_linear(torch.relu(hidden), self.per_sample(self.active(net.linear2.weight)),
                                 self.per_sample(self.active(net.linear2.bias)))

    def per_image_text(self, ctx: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features ``[n, C, E]`` of the per-image contexts ``ctx`` ``[n, n_ctx, D]``: one encoder
        call on the ``n x C`` sentences, or chunks of at most ``max_sentences`` sentences (checkpointed in
        training; see the module docstring)."""
        per_call = max(1, self.settings.max_sentences // max(1, len(self.classnames)))
        if ctx.shape[0] <= per_call:
            return self.encode_context(ctx)
        chunks = ctx.split(per_call)
        if torch.is_grad_enabled() and ctx.requires_grad:
            return torch.cat([checkpoint(self.encode_context, chunk, use_reentrant=False) for chunk in chunks])
        return torch.cat([self.encode_context(chunk) for chunk in chunks])

    def logits(self, text: torch.Tensor, image: torch.Tensor, batch: dict) -> torch.Tensor:
        """``logit_scale * cos(x_b, g(ctx + pi_b))`` ``[n, C]``, each image with its own client's context and meta-net."""
        ctx = self.per_sample(text) + self.image_bias(image).unsqueeze(1).to(text.dtype)  # [n, n_ctx, D]
        feats = self.per_image_text(ctx)
        return self._logit_scale * torch.einsum("ne,nce->nc", image, feats)


@dataclass(kw_only=True, eq=False)
class CoCoOp(TrainedMethod):
    """CoCoOp (FedCoCoOp): a shared context plus a shared meta-net that adds a per-image bias to every context token.

    Sent and averaged (sample-weighted FedAvg): the context ``prompt.ctx`` and the four meta-net tensors
    ``meta_net.linear1.weight``/``bias`` and ``meta_net.linear2.weight``/``bias`` (as FLiP and FedMGP's release);
    nothing stays local. The defaults are the official ``vit_b16_c4_ep10_batch1_ctxv1`` config's: 4 context vectors
    from "a photo of a", SGD lr 0.002 (momentum 0.9, weight decay 5e-4), batch size 1 (``train.batch_size``). FLiP
    runs the same maths with a random context (``ctx_init: null``) and weight decay 1e-4
    (``configs/cocoop_*_flip.yaml``); FedMGP's release uses 16 random context vectors, batch 8 and lr 0.001.

    The text encoder runs on every image's own prompts, all images of all clients of a lock-step step in one call,
    in chunks of at most ``max_sentences`` sentences (see :mod:`fedprompt.methods.cocoop` for the memory bound).
    """

    n_ctx: Optional[int] = 4
    """Context tokens (4 in the official ctxv1 config; null: the token count of ctx_init)."""
    ctx_init: Optional[str] = "a photo of a"
    """Initialisation words ("a photo of a" in the official ctxv1 config; null: random N(0, 0.02^2), as FLiP)."""
    max_sentences: int = 4096
    """The most sentences (images x classes) per text-encoder call; above it the images are encoded in chunks,
    checkpointed in training, which bounds the text encoder's activation memory (see the module docstring)."""
    lr: float = 0.002
    """Local SGD learning rate (0.002 in the official config and in FLiP)."""

    client_class = CoCoOpClient
    shared_prefixes = ("prompt.", "meta_net.")

    def check(self):
        if self.n_ctx is not None and self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1 (or null with ctx_init), got {self.n_ctx}")
        if self.n_ctx is None and not self.ctx_init:
            raise FedPromptError("method.n_ctx is null but method.ctx_init is not set: give n_ctx, or ctx_init to "
                                 "take its token count.")
        if self.max_sentences < 1:
            raise FedPromptError(f"method.max_sentences must be >= 1 (sentences per text-encoder call), got "
                                 f"{self.max_sentences}")
