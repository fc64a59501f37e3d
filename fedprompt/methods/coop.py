"""CoOp prompts and the methods built directly on them: PromptFL (FedAvg of the context), local CoOp (no
communication), PromptFL+FedProx (proximal term on the live parameters) and PromptFL+FedPer (half the tokens local).

Sentence: ``[SOS] ctx_1 .. ctx_M <class>. [EOS]``; logits = logit_scale * cos(image, text(ctx)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, NoCommunication, WeightedMean
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors


class CoOpClient(PromptClient):
    """Clients with one CoOp context each (``prompt.ctx``: [n_ctx, D], or [C, n_ctx, D] class-specific, per client),
    from the settings ``n_ctx``, ``ctx_init`` and ``csc`` of a CoOp-family method."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx or (words.shape[0] if words is not None else 16)
        self.switchable_classes = not settings.csc
        self.prompt = ContextVectors(self.n_ctx, backbone.ctx_dim, n_cls=len(classnames) if settings.csc else None,
                                     words=words, slots=slots)

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features [A, C, E] of the active clients (one encoder call)."""
        return self.encode_context(self.active(self.prompt.ctx), class_specific=self.prompt.class_specific)


@dataclass(kw_only=True, eq=False)
class _CoOpMethod(TrainedMethod):
    """The CoOp prompt settings shared by PromptFL, LocalCoOp, FedProx and FedPer."""

    n_ctx: Optional[int] = 16
    """Context tokens (16 in PromptFL; null: the token count of ctx_init)."""
    ctx_init: Optional[str] = None
    """Initialisation words (e.g. "a photo of a"; null: random N(0, 0.02^2), as the official code)."""
    csc: bool = False
    """Class-specific context (one context per class)."""

    client_class = CoOpClient
    shared_prefixes = ("prompt.",)

    def check(self):
        if self.n_ctx is not None and self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1 (or null with ctx_init), got {self.n_ctx}")


@dataclass(kw_only=True, eq=False)
class PromptFL(_CoOpMethod):
    """PromptFL: every client trains a CoOp context; the server takes its sample-weighted mean (FedAvg).

    PromptFL's official config uses ``lr_schedule: cosine`` with one warm-up epoch at 1e-5; ``lr_scope: official``
    reproduces its single scheduler for the whole run (see :class:`fedprompt.methods.OptimizerArgs`).
    """

    weighted: bool = True
    """Sample-weighted mean (the re-implementations); false is the official unweighted mean."""

    def build_aggregator(self) -> Aggregator:
        return WeightedMean(self.shared_prefixes, weighted=self.weighted)


@dataclass(kw_only=True, eq=False)
class LocalCoOp(_CoOpMethod):
    """CoOp trained on each client's own data only; nothing is communicated (the lower bound of federation)."""

    communicates = False
    global_model = False
    shared_prefixes = ()

    def build_aggregator(self) -> Aggregator:
        return NoCommunication()


class FedProxClient(CoOpClient):
    """CoOp client with the proximal term (mu/2) ||ctx - ctx_global||^2 computed on the live parameter."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.register_buffer("global_ctx", self.prompt.ctx.detach().clone(), persistent=False)

    def on_round_start(self, global_state):
        """The round's global context: the server's state, or (round 1, nothing aggregated yet) the clients' own."""
        if global_state and "prompt.ctx" in global_state:
            self.global_ctx = global_state["prompt.ctx"].detach().to(self.prompt.ctx.device).expand_as(
                self.prompt.ctx).clone()
        else:
            self.global_ctx = self.prompt.ctx.detach().clone()

    def extra_loss(self, batch, logits, text):
        diff = self.active(self.prompt.ctx) - self.active(self.global_ctx)
        return 0.5 * self.settings.mu * diff.pow(2).flatten(1).sum(1)


@dataclass(kw_only=True, eq=False)
class FedProx(PromptFL):
    """PromptFL + FedProx: loss = CE + (mu/2) ||ctx - ctx_global||^2 on the live parameter, so it has a gradient
    mu (ctx - ctx_global) (the official codebases compute it from a detached ``state_dict()``: a no-op)."""

    mu: float = 0.5
    """Proximal weight (0.5 in the papers' code)."""

    client_class = FedProxClient

    def check(self):
        super().check()
        if self.mu < 0:
            raise FedPromptError(f"method.mu must be >= 0, got {self.mu}")


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


@dataclass(kw_only=True, eq=False)
class FedPer(PromptFL):
    """PromptFL + FedPer: the first half of the context tokens is shared (FedAvg), the second half stays local."""

    n_ctx: Optional[int] = 8
    """Context tokens (8 in PromptFolio's baseline: 4 shared + 4 local)."""
    n_shared: Optional[int] = None
    """Shared tokens (null: n_ctx // 2)."""

    global_model = False

    def build_aggregator(self) -> Aggregator:
        n = self.n_shared if self.n_shared is not None else (self.n_ctx or 16) // 2
        return FedPerAggregator(n, self.weighted)
