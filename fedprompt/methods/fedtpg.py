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

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import PromptGenerator
from fedprompt.prompts.stacked import SlotStacked


class FedTPGClient(PromptClient):
    """Clients holding one prompt generator each (``generator.*``, stacked over slots), from the :class:`FedTPG`
    settings."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.n_ctx = settings.n_ctx
        template = PromptGenerator(backbone.ctx_dim, settings.n_ctx, backbone.embed_dim, settings.heads,
                                   settings.ff_mult, settings.attn_residual)
        self.generator = SlotStacked(template, slots)

    @torch.no_grad()
    def class_embeddings(self, classnames: list[str]) -> torch.Tensor:
        """L2-normalised frozen text features of the plain class names [C, E] (the generator's keys and values)."""
        names = [name.replace("_", " ") for name in classnames]
        return F.normalize(self.backbone.encode_text(names).float(), dim=-1)

    def class_data(self, classnames: list[str]) -> dict:
        return {**super().class_data(classnames), "names": self.class_embeddings(classnames)}

    def context(self) -> torch.Tensor:
        """The generated context [A, n_ctx, D] of each active client for the current class list."""
        names = self.frozen("names", self.device)
        return self.run_per_client(self.generator, self.for_each_client(names))

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features [A, C, E] with the generated context (one encoder call)."""
        return self.encode_context(self.context())


@dataclass(kw_only=True, eq=False)
class FedTPG(TrainedMethod):
    """FedTPG: a text-driven prompt generator, trained by every client and averaged (unweighted) by the server.

    The defaults are the released cross_cls settings: SGD lr 0.003, momentum 0.9, weight decay 1e-5, and torch's
    ``CosineAnnealingLR(T_max = 500)`` without warm-up, one scheduler per client stepped after each of its local
    passes (``lr_scope: client``). Difference from the released code: each client gets a fresh optimizer every round
    (the released client keeps its SGD momentum buffer across rounds), as for every fedprompt method.
    """

    n_ctx: int = 4
    """Generated context vectors (4)."""
    heads: int = 4
    """Attention heads of the generator's cross-attention (4)."""
    ff_mult: int = 4
    """Hidden width of its GEGLU feed-forward block, as a multiple of the token width (4)."""
    attn_residual: bool = False
    """Add the queries back after the attention (the released model lets the attention output replace them)."""
    weighted: bool = False
    """Sample-weighted mean instead of the official unweighted one."""
    lr: float = 0.003
    """Local SGD learning rate (the cross_cls setting: 0.003)."""
    weight_decay: float = 1e-5
    """SGD weight decay (the cross_cls setting: 1e-5)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """cosine (the cross_cls setting) or constant."""
    lr_scope: Literal["local", "official", "client"] = "client"
    """What one cosine spans: client (default, the released code: each client's own scheduler over the whole run,
    stepped after each of its local epochs), local (restarted every local round) or official (one schedule shared by
    all clients)."""
    cosine_epochs: Optional[int] = 500
    """The cosine's T_max in epochs (the released MAX_EPOCH = the rounds: 500 for cross_cls; set it to
    federation.rounds x the local epochs for another run length; null: the local epochs)."""

    client_class = FedTPGClient
    shared_prefixes = ("generator.",)
    global_model = True

    def build_aggregator(self) -> Aggregator:
        return WeightedMean(self.shared_prefixes, weighted=self.weighted, reduce=True)
