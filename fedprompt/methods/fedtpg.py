"""FedTPG (Qiu et al., ICLR 2024): a prompt generator shared by all clients, driven by the class names.

Instead of prompt vectors, every client trains the same small network (:class:`fedprompt.prompts.PromptGenerator`):
``n_ctx`` learnable queries attend to the frozen CLIP text features of the client's plain class names, and the
result is the context of the sentence ``"X X X X {class}."``. The generator is the only trained and communicated
part (unweighted FedAvg of about 4.2M parameters for ViT-B/16), so after a round every client holds the same model,
and it applies to classes and datasets it never saw (the ``cross_cls`` protocol: ``configs/fedtpg_cross_cls.yaml``).

Because the uploads are megabytes, the aggregation runs as an all-reduce of per-process sums
(:class:`fedprompt.federation.aggregators.WeightedMean` with ``reduce=True``) instead of gathering every client's
state on every process.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.backbone import Backbone
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import Method, OptimizerArgs
from fedprompt.prompts import PromptGenerator
from fedprompt.prompts.stacked import SlotStacked


class FedTPGClient(PromptClient):
    """Clients holding one prompt generator each (``generator.*``, stacked over slots).

    Args:
        backbone: frozen backbone.
        classnames: class names in label order.
        n_ctx: generated context vectors.
        heads: attention heads of the generator.
        ff_mult: feed-forward width multiple.
        attn_residual: residual around the attention (the released model has none).
        optim: local optimiser settings.
        slots: clients held by this module.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], n_ctx: int = 4, heads: int = 4, ff_mult: int = 4,
                 attn_residual: bool = False, optim: OptimizerArgs | None = None, slots: int = 1):
        super().__init__(backbone, classnames, optim, slots)
        self.n_ctx = n_ctx
        template = PromptGenerator(backbone.ctx_dim, n_ctx, backbone.embed_dim, heads, ff_mult, attn_residual)
        self.generator = SlotStacked(template, slots)

    @torch.no_grad()
    def class_embeddings(self, classnames: list[str]) -> torch.Tensor:
        """L2-normalised frozen text features of the plain class names [C, E] (the generator's keys and values)."""
        names = [name.replace("_", " ") for name in classnames]
        return F.normalize(self.backbone.encode_text(names).float(), dim=-1)

    def class_data(self, classnames: list[str]) -> dict:
        return {**super().class_data(classnames), "names": self.class_embeddings(classnames)}

    def context(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """The generated context [A, n_ctx, D] of each client in ``slots`` for the current class list."""
        slots = self.all_slots() if slots is None else slots
        names = self.frozen("names", slots.device)
        return self.generator(slots, names.expand(slots.shape[0], *names.shape))

    def text_features(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text features [A, C, E] with the generated context (one encoder call)."""
        ctx = self.context(slots)
        feats = self.backbone.encode_prompts(self.frozen("tokens", ctx.device), ctx)
        return F.normalize(feats.float(), dim=-1)


class FedTPG(Method):
    """FedTPG: a text-driven prompt generator, trained by every client and averaged (unweighted) by the server.

    The defaults are the released cross_cls settings: SGD lr 0.003, momentum 0.9, weight decay 1e-5, and torch's
    ``CosineAnnealingLR(T_max = 500)`` without warm-up, one scheduler per client stepped after each of its local
    passes (``lr_scope: client``). Difference from the released code: each client gets a fresh optimizer every round
    (the released client keeps its SGD momentum buffer across rounds), as for every fedprompt method.

    Args:
        n_ctx: generated context vectors (4).
        heads: attention heads of the generator's cross-attention (4).
        ff_mult: hidden width of its GEGLU feed-forward block, as a multiple of the token width (4).
        attn_residual: add the queries back after the attention (the released model lets the attention output
            replace them: ``False``).
        weighted: sample-weighted mean instead of the official unweighted one.
        lr: local SGD learning rate (the cross_cls setting: 0.003).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (the cross_cls setting: 1e-5).
        lr_schedule: ``cosine`` (the cross_cls setting) or ``constant``.
        warmup_epochs: epochs at ``warmup_lr`` before the cosine (the released code has none: 0).
        warmup_lr: the constant warm-up learning rate.
        lr_scope: what one cosine spans (:class:`fedprompt.methods.OptimizerArgs`): ``client`` (default, the
            released code: each client's own scheduler over the whole run, stepped after each of its local epochs),
            ``local`` (restarted every local round) or ``official`` (one schedule shared by all clients).
        cosine_epochs: the cosine's T_max in epochs (the released ``MAX_EPOCH`` = the rounds: 500 for cross_cls; set
            it to ``federation.rounds`` x the local epochs for another run length; ``None``: the local epochs).
    """

    shared_prefixes = ("generator.",)
    global_model = True

    def __init__(self, n_ctx: int = 4, heads: int = 4, ff_mult: int = 4, attn_residual: bool = False,
                 weighted: bool = False, lr: float = 0.003, momentum: float = 0.9, weight_decay: float = 1e-5,
                 lr_schedule: Literal["constant", "cosine"] = "cosine", warmup_epochs: int = 0,
                 warmup_lr: float = 1e-5, lr_scope: Literal["local", "official", "client"] = "client",
                 cosine_epochs: Optional[int] = 500):
        super().__init__(lr, momentum, weight_decay, lr_schedule, warmup_epochs, warmup_lr, lr_scope, cosine_epochs)
        self.n_ctx, self.heads, self.ff_mult, self.attn_residual = n_ctx, heads, ff_mult, attn_residual
        self.weighted = weighted

    def build_client(self, backbone: Backbone, classnames: list[str], slots: int = 1) -> FedTPGClient:
        return FedTPGClient(backbone, classnames, self.n_ctx, self.heads, self.ff_mult, self.attn_residual,
                            self.optim, slots)

    def build_aggregator(self) -> Aggregator:
        return WeightedMean(self.shared_prefixes, weighted=self.weighted, reduce=True)
