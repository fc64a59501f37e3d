"""CoOp prompts and the methods built directly on them: PromptFL (FedAvg of the context), local CoOp (no
communication), PromptFL+FedProx (proximal term on the live parameters) and PromptFL+FedPer (half the tokens local).

Sentence: ``[SOS] ctx_1 .. ctx_M <class>. [EOS]``; logits = logit_scale * cos(image, text(ctx)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedprompt.backbone import Backbone
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, NoCommunication, WeightedMean
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import Method, OptimizerArgs
from fedprompt.prompts import ContextVectors


class CoOpClient(PromptClient):
    """Clients with one CoOp context each (``prompt.ctx``: [n_ctx, D], or [C, n_ctx, D] class-specific, per client).

    Args:
        backbone: frozen backbone.
        classnames: class names in label order.
        n_ctx: number of context tokens (inferred from ``ctx_init`` when ``None``).
        ctx_init: initialise from these words (e.g. ``"a photo of a"``) instead of N(0, 0.02^2).
        csc: class-specific context.
        optim: local optimiser settings.
        slots: clients held by this module.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], n_ctx: int | None = 16, ctx_init: str | None = None,
                 csc: bool = False, optim: OptimizerArgs | None = None, slots: int = 1):
        super().__init__(backbone, classnames, optim, slots)
        words = backbone.word_embeddings(ctx_init).cpu() if ctx_init else None
        self.n_ctx = n_ctx or (words.shape[0] if words is not None else 16)
        self.switchable_classes = not csc
        self.prompt = ContextVectors(self.n_ctx, backbone.ctx_dim, n_cls=len(classnames) if csc else None,
                                     words=words, slots=slots)

    def text_features(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text features [A, C, E] of the clients in ``slots`` (default all; one encoder call)."""
        ctx = self.prompt.ctx if slots is None else self.prompt.ctx[slots]
        feats = self.backbone.encode_prompts(self.frozen("tokens", ctx.device), ctx,
                                             class_specific=self.prompt.class_specific)
        return F.normalize(feats.float(), dim=-1)


class _CoOpMethod(Method):
    shared_prefixes = ("prompt.",)

    def __init__(self, n_ctx: int | None = 16, ctx_init: str | None = None, csc: bool = False, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4,
                 lr_schedule: str = "constant", warmup_epochs: int = 0, warmup_lr: float = 1e-5,
                 lr_scope: str = "local", cosine_epochs: int | None = None):
        super().__init__(lr, momentum, weight_decay, lr_schedule, warmup_epochs, warmup_lr, lr_scope, cosine_epochs)
        if n_ctx is not None and n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1 (or null with ctx_init), got {n_ctx}")
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.csc = csc

    def build_client(self, backbone, classnames, slots=1):
        return CoOpClient(backbone, classnames, self.n_ctx, self.ctx_init, self.csc, self.optim, slots)


class PromptFL(_CoOpMethod):
    """PromptFL: every client trains a CoOp context; the server takes its sample-weighted mean (FedAvg).

    Args:
        n_ctx: context tokens (16 in PromptFL).
        ctx_init: initialisation words (``None``: random N(0, 0.02^2), as the official code).
        csc: class-specific context.
        weighted: sample-weighted mean (the re-implementations); ``False`` is the official unweighted mean.
        lr: local SGD learning rate (PromptFL's config: 0.002).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: ``constant`` or ``cosine`` (PromptFL's official config: cosine, 1 warm-up epoch at 1e-5).
        warmup_epochs: cosine: warm-up epochs at ``warmup_lr``.
        warmup_lr: cosine: the warm-up learning rate.
        lr_scope: ``local`` (each client's local round is one schedule) or ``official`` (one schedule for the whole
            run, as the released trainer; see :class:`fedprompt.methods.OptimizerArgs`).
        cosine_epochs: cosine: T_max (default the local epochs).
    """

    def __init__(self, n_ctx: int | None = 16, ctx_init: str | None = None, csc: bool = False, weighted: bool = True,
                 lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4,
                 lr_schedule: str = "constant", warmup_epochs: int = 0, warmup_lr: float = 1e-5,
                 lr_scope: str = "local", cosine_epochs: int | None = None):
        super().__init__(n_ctx, ctx_init, csc, lr, momentum, weight_decay, lr_schedule, warmup_epochs, warmup_lr,
                         lr_scope, cosine_epochs)
        self.weighted = weighted

    def build_aggregator(self) -> Aggregator:
        return WeightedMean(self.shared_prefixes, weighted=self.weighted)


class LocalCoOp(_CoOpMethod):
    """CoOp trained on each client's own data only; nothing is communicated (the lower bound of federation).

    Args:
        n_ctx: context tokens.
        ctx_init: initialisation words (``None``: random).
        csc: class-specific context.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: ``constant`` or ``cosine`` (PromptFL's official config: cosine, 1 warm-up epoch at 1e-5).
        warmup_epochs: cosine: warm-up epochs at ``warmup_lr``.
        warmup_lr: cosine: the warm-up learning rate.
        lr_scope: ``local`` (each client's local round is one schedule) or ``official`` (one schedule for the whole
            run, as the released trainer; see :class:`fedprompt.methods.OptimizerArgs`).
        cosine_epochs: cosine: T_max (default the local epochs).
    """

    communicates = False
    global_model = False
    shared_prefixes = ()

    def build_aggregator(self) -> Aggregator:
        return NoCommunication()


class FedProxClient(CoOpClient):
    """CoOp client with the proximal term (mu/2) ||ctx - ctx_global||^2 computed on the live parameter."""

    def __init__(self, *args, mu: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.mu = mu
        self.register_buffer("global_ctx", self.prompt.ctx.detach().clone(), persistent=False)

    def on_round_start(self, global_state):
        """The round's global context: the server's state, or (round 1, nothing aggregated yet) the clients' own."""
        if global_state and "prompt.ctx" in global_state:
            self.global_ctx = global_state["prompt.ctx"].detach().to(self.prompt.ctx.device).expand_as(
                self.prompt.ctx).clone()
        else:
            self.global_ctx = self.prompt.ctx.detach().clone()

    def extra_loss(self, batch, logits, text):
        slots = batch["slots"]
        diff = self.prompt.ctx[slots] - self.global_ctx[slots]
        return 0.5 * self.mu * diff.pow(2).flatten(1).sum(1)


class FedProx(PromptFL):
    """PromptFL + FedProx: loss = CE + (mu/2) ||ctx - ctx_global||^2 on the live parameter, so it has a gradient
    mu (ctx - ctx_global) (the official codebases compute it from a detached ``state_dict()``: a no-op).

    Args:
        mu: proximal weight (0.5 in the papers' code).
        n_ctx: context tokens.
        ctx_init: initialisation words.
        csc: class-specific context.
        weighted: sample-weighted mean.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: ``constant`` or ``cosine`` (PromptFL's official config: cosine, 1 warm-up epoch at 1e-5).
        warmup_epochs: cosine: warm-up epochs at ``warmup_lr``.
        warmup_lr: cosine: the warm-up learning rate.
        lr_scope: ``local`` (each client's local round is one schedule) or ``official`` (one schedule for the whole
            run, as the released trainer; see :class:`fedprompt.methods.OptimizerArgs`).
        cosine_epochs: cosine: T_max (default the local epochs).
    """

    def __init__(self, mu: float = 0.5, n_ctx: int | None = 16, ctx_init: str | None = None, csc: bool = False,
                 weighted: bool = True, lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4,
                 lr_schedule: str = "constant", warmup_epochs: int = 0, warmup_lr: float = 1e-5,
                 lr_scope: str = "local", cosine_epochs: int | None = None):
        super().__init__(n_ctx, ctx_init, csc, weighted, lr, momentum, weight_decay, lr_schedule, warmup_epochs,
                         warmup_lr, lr_scope, cosine_epochs)
        if mu < 0:
            raise FedPromptError(f"method.mu must be >= 0, got {mu}")
        self.mu = mu

    def build_client(self, backbone, classnames, slots=1):
        return FedProxClient(backbone, classnames, self.n_ctx, self.ctx_init, self.csc, self.optim, slots, mu=self.mu)


class FedPerAggregator(WeightedMean):
    """FedAvg of the first ``n_shared`` context tokens; the other tokens stay on the client."""

    def __init__(self, n_shared: int, weighted: bool = True):
        super().__init__(("prompt.ctx",), weighted)
        self.n_shared = n_shared

    def upload(self, client_id, state, round_idx):
        return {"prompt.ctx": state["prompt.ctx"][..., : self.n_shared, :]}

    def apply(self, client_state, received, client_id):
        ctx = client_state["prompt.ctx"].clone()
        ctx[..., : self.n_shared, :] = received["prompt.ctx"]
        return {**client_state, "prompt.ctx": ctx}


class FedPer(PromptFL):
    """PromptFL + FedPer: the first half of the context tokens is shared (FedAvg), the second half stays local.

    Args:
        n_ctx: context tokens (8 in PromptFolio's baseline: 4 shared + 4 local).
        n_shared: shared tokens (default n_ctx // 2).
        ctx_init: initialisation words.
        csc: class-specific context.
        weighted: sample-weighted mean.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: ``constant`` or ``cosine`` (PromptFL's official config: cosine, 1 warm-up epoch at 1e-5).
        warmup_epochs: cosine: warm-up epochs at ``warmup_lr``.
        warmup_lr: cosine: the warm-up learning rate.
        lr_scope: ``local`` (each client's local round is one schedule) or ``official`` (one schedule for the whole
            run, as the released trainer; see :class:`fedprompt.methods.OptimizerArgs`).
        cosine_epochs: cosine: T_max (default the local epochs).
    """

    global_model = False

    def __init__(self, n_ctx: int | None = 8, n_shared: int | None = None, ctx_init: str | None = None,
                 csc: bool = False, weighted: bool = True, lr: float = 0.002, momentum: float = 0.9,
                 weight_decay: float = 5e-4,
                 lr_schedule: str = "constant", warmup_epochs: int = 0, warmup_lr: float = 1e-5,
                 lr_scope: str = "local", cosine_epochs: int | None = None):
        super().__init__(n_ctx, ctx_init, csc, weighted, lr, momentum, weight_decay, lr_schedule, warmup_epochs,
                         warmup_lr, lr_scope, cosine_epochs)
        self.n_shared = n_shared

    def build_aggregator(self) -> Aggregator:
        n = self.n_shared if self.n_shared is not None else (self.n_ctx or 16) // 2
        return FedPerAggregator(n, self.weighted)
