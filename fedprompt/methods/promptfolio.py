"""PromptFolio (Pan et al., NeurIPS 2024): a global and a local prompt whose text features are mixed like a portfolio.

Each client holds two unified CoOp contexts, ``global_prompt.ctx`` and ``local_prompt.ctx`` ([n_ctx, D] each,
N(0, 0.02^2)). Both go through the text encoder in one call; the class text feature is the mixture

    t_c = (1 - theta) * f_global[c] + theta * f_local[c]

of the two L2-normalised features, NOT normalised again (as the official code), and the logits are
``logit_scale * image @ t^T`` with the L2-normalised image feature. Only the global prompt is sent to the server
(sample-weighted FedAvg); the local prompt stays on the client.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.backbone import Backbone
from fedprompt.errors import FedPromptError
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import Method, OptimizerArgs
from fedprompt.prompts import ContextVectors


def mix_features(global_features: torch.Tensor, local_features: torch.Tensor, theta: float) -> torch.Tensor:
    """PromptFolio's text feature ``(1 - theta) * global + theta * local`` (no re-normalisation)."""
    return (1.0 - theta) * global_features + theta * local_features


class PromptFolioClient(PromptClient):
    """PromptFolio clients: ``global_prompt.ctx`` (shared) and ``local_prompt.ctx`` (kept).

    Args:
        backbone: frozen backbone.
        classnames: class names in label order.
        n_ctx: context tokens per prompt.
        theta: weight of the local prompt's features in the mixture.
        optim: local optimiser settings.
        ctx_init: initialise both prompts from these words instead of N(0, 0.02^2).
        slots: clients held by this module.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], n_ctx: int = 8, theta: float = 0.4,
                 optim: OptimizerArgs | None = None, ctx_init: str | None = None, slots: int = 1):
        super().__init__(backbone, classnames, optim, slots)
        words = backbone.word_embeddings(ctx_init).cpu() if ctx_init else None
        self.n_ctx = n_ctx
        self.global_prompt = ContextVectors(n_ctx, backbone.ctx_dim, words=words, slots=slots)
        self.local_prompt = ContextVectors(n_ctx, backbone.ctx_dim, words=words, slots=slots)
        self.theta = theta

    def prompt_features(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised features ``[A, 2, C, E]`` of the global (index 0) and local (index 1) prompts of the clients
        in ``slots`` (default all), from one encoder call."""
        ctx = torch.stack([self.global_prompt.ctx, self.local_prompt.ctx], dim=1)
        ctx = ctx if slots is None else ctx[slots]
        feats = self.backbone.encode_prompts(self.frozen("tokens", ctx.device), ctx)
        return F.normalize(feats.float(), dim=-1)

    def text_features(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """The mixed class text features ``[A, C, E]`` (see :func:`mix_features`)."""
        feats = self.prompt_features(slots)
        return mix_features(feats[:, 0], feats[:, 1], self.theta)


class PromptFolio(Method):
    """PromptFolio: global (shared) + local (kept) prompt, text features mixed with weight theta on the local one.

    ``theta`` = 0 classifies with the global prompt alone, 1 with the local prompt alone. The mixture is not
    re-normalised, as in the official code, so its norm (below 1 when the two features differ) scales the logits.

    The defaults are the official ``configs/trainers/PromptFolio/vit_b16.yaml`` (which overrides the command line):
    lr 0.002, Dassl's cosine schedule with one warm-up epoch at 1e-5, and 5 local epochs (``train.local_epochs``).
    Differences from the released code: each client's local round runs its own schedule (``lr_scope: local``;
    ``lr_scope: official`` reproduces the released single scheduler shared by all clients, see
    :class:`fedprompt.methods.OptimizerArgs`), each client gets a fresh optimizer every round (the released trainer
    shares SGD momentum across clients and rounds), every client is evaluated each evaluated round (the released
    code tests only the round's sampled clients), class lists are ordered, and the extra image-encoder pass per step
    whose output is never used is not made.

    Args:
        n_ctx: context tokens per prompt (8, the official default).
        theta: weight of the local prompt's text features (the official ``frac_p``, 0.4).
        ctx_init: initialise both prompts from these words (``None``: random N(0, 0.02^2), as the official code).
        lr: local SGD learning rate (0.002 in vit_b16.yaml).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: ``cosine`` (vit_b16.yaml) or ``constant``.
        warmup_epochs: epochs at ``warmup_lr`` before the cosine (1).
        warmup_lr: the constant warm-up learning rate (1e-5).
        lr_scope: ``local`` (each client's local round is one schedule) or ``official`` (one schedule for the whole
            run, shared by all clients in training order).
        cosine_epochs: the cosine's T_max in epochs (``None``: the local epochs, as ``MAX_EPOCH``).
    """

    shared_prefixes = ("global_prompt.",)
    global_model = False

    def __init__(self, n_ctx: int = 8, theta: float = 0.4, ctx_init: Optional[str] = None, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4,
                 lr_schedule: Literal["constant", "cosine"] = "cosine", warmup_epochs: int = 1,
                 warmup_lr: float = 1e-5, lr_scope: Literal["local", "official"] = "local",
                 cosine_epochs: Optional[int] = None):
        super().__init__(lr, momentum, weight_decay, lr_schedule, warmup_epochs, warmup_lr, lr_scope, cosine_epochs)
        if n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {n_ctx}")
        if not 0.0 <= theta <= 1.0:
            raise FedPromptError(f"method.theta must be in [0, 1] (the local prompt's weight), got {theta}")
        self.n_ctx = n_ctx
        self.theta = theta
        self.ctx_init = ctx_init

    def build_client(self, backbone: Backbone, classnames: list[str], slots: int = 1) -> PromptFolioClient:
        return PromptFolioClient(backbone, classnames, self.n_ctx, self.theta, self.optim, self.ctx_init, slots)
